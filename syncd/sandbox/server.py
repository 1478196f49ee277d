"""The fake WalkMe Segments API: an aiohttp.web server holding segments in memory.

It serves the real API's paths with the real API's documented rules (OAuth client
credentials, 25,000 ids per request, 100 characters per id) and adds seeded,
deterministic fault injection plus introspection, in process and over HTTP.

Members are kept as ``set[str]`` and every change is a single set operation, so a
segment of 10,000,000 members costs memory but no per-request Python loops beyond
validating the (at most 25,000) ids of the request itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import email.utils
import hmac
import itertools
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, get_args

from aiohttp import web

from syncd.http_server import start_server
from syncd.sandbox.faults import Faults

SANDBOX_SYSTEM_GUID: Final = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
DEFAULT_CLIENT_ID: Final = "sandbox-client"
DEFAULT_CLIENT_SECRET: Final = "sandbox-secret"  # noqa: S105 - a fake server's fixed test secret

TOKEN_PATH: Final = "/accounts/connect/token"  # noqa: S105 - a URL path, not a secret
SEGMENTS_PATH: Final = "/public/v1/user/system/{system_guid}/segment"
SEGMENT_PATH: Final = SEGMENTS_PATH + "/{segment_guid}"
# 25,000 ids of 100 characters are ~2.6 MB of JSON; leave room for escaping.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024

ListShape = Literal["bare", "data", "segments"]
RequestKind = Literal["token", "create", "update", "list", "delete"]
UpdateAction = Literal["add", "remove", "override"]

_ACTIONS: Final[frozenset[str]] = frozenset(get_args(UpdateAction))
_GUID_RE: Final = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_INVALID_IDS_SHOWN: Final = 10
_SERVER_ERRORS: Final = (500, 502, 503)
# A gateway in front of the API answers 502 in HTML, not JSON; clients must cope.
_BAD_GATEWAY_HTML: Final = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center></body></html>\n"
)


@dataclass(eq=False)
class SegmentRecord:
    """One stored segment. ``members`` is live; read it via ``WalkMeSandbox.members``."""

    guid: str
    system_guid: str
    name: str
    external_id: str | None
    # repr=False: printing a 10,000,000-member set in a failing assert would hang.
    members: set[str] = field(default_factory=set, repr=False)

    def public(self) -> dict[str, Any]:
        """The object as the API shows it (no members: WalkMe never returns them)."""
        return {"segmentGuid": self.guid, "externalId": self.external_id, "name": self.name}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One API request as the sandbox saw it.

    ``status`` is 0 when the connection was dropped without an answer; ``n_ids`` is
    None when the body was not examined (faulted, unauthorised or malformed).
    """

    kind: RequestKind
    method: str
    path: str
    action: str | None
    n_ids: int | None
    status: int
    applied: bool
    dropped: bool = False
    retry_after: str | None = None  # the Retry-After header of the answer, if any


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """A segment change the sandbox applied, as its apply hooks and stalls see it."""

    action: str  # "create", "delete", or the update's "add", "remove" or "override"
    segment_guid: str
    ids: tuple[str, ...]  # the request's userIds, in the order sent
    port: int  # the local port it came in on: see ``WalkMeSandbox.listen_also``


@dataclass(frozen=True, slots=True)
class _Scripted:
    status: int
    retry_after: str | None = None
    body: dict[str, Any] | str | None = None
    drop: bool = False


@dataclass(frozen=True, slots=True)
class _Token:
    client_id: str
    expires_at: float  # time.monotonic()


@dataclass(slots=True)
class _Call:
    """What one request did, filled in while it is handled and recorded at the end."""

    kind: RequestKind
    action: str | None = None
    n_ids: int | None = None
    applied: bool = False
    drop: bool = False
    write_number: int | None = None  # creates and updates, 1-based, in arrival order
    change: AppliedChange | None = None


@dataclass(frozen=True, slots=True)
class _Stall:
    from_write: int
    seconds: float


class _Answer(Exception):
    """Raised to end a request early with a ready response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _error(status: int, error: str, message: str | None = None, **extra: Any) -> _Answer:
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    body.update(extra)
    return _Answer(web.json_response(body, status=status))


def _validation_error(message: str, invalid: Iterable[object] = ()) -> _Answer:
    return _error(
        400,
        "validation_error",
        message,
        invalidUserIds=list(itertools.islice(invalid, _INVALID_IDS_SHOWN)),
    )


def _format_seconds(seconds: float) -> str:
    # Whole seconds as the RFC's integer form; fractions only when a test asks for them.
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _validation_error(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _validation_error("body must be a JSON object")
    return body


class WalkMeSandbox:
    """A WalkMe-compatible Segments API server on aiohttp.web.

    All mutable state is guarded by one ``threading.Lock`` so a test thread can read
    it while the server runs on another thread's event loop.
    """

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        systems: Iterable[str] = (SANDBOX_SYSTEM_GUID,),
        token_lifetime: float = 86400.0,
        faults: Faults | None = None,
        max_ids: int = 25_000,
        max_id_len: int = 100,
        list_shape: ListShape = "data",
        create_returns_guid: bool = True,
        rejected_ids: Iterable[str] = (),
        forbidden_clients: Iterable[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if list_shape not in get_args(ListShape):
            raise ValueError(f"list_shape must be one of {get_args(ListShape)}")
        self.client_id = client_id
        self.client_secret = client_secret
        self.systems: set[str] = {s.lower() for s in systems}
        self.token_lifetime = token_lifetime
        self.max_ids = max_ids
        self.max_id_len = max_id_len
        self.list_shape: ListShape = list_shape
        self.create_returns_guid = create_returns_guid
        self.rejected_ids: set[str] = set(rejected_ids)
        self.forbidden_clients: set[str] = set(forbidden_clients)
        # Larger request bodies are answered 413, as a proxy in front of WalkMe does.
        self.max_body_bytes = max_body_bytes
        self.segments: dict[str, SegmentRecord] = {}
        self.requests: list[RequestRecord] = []
        self.tokens_issued = 0
        self._faults = faults or Faults()
        self._rng = random.Random(self._faults.seed)
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._script: deque[_Scripted] = deque()
        self._token_script: deque[_Scripted] = deque()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        # Every access token issued, kept after it expired or was revoked.
        self.issued_tokens: list[str] = []
        # Changes whose answers a stall held back, in order.
        self.stalled: list[AppliedChange] = []
        self._writes_received = 0
        self._stall: _Stall | None = None
        self._drops_after_apply: Counter[RequestKind] = Counter()
        self._request_hooks: list[Callable[[RequestKind], None]] = []
        self._apply_hooks: list[Callable[[AppliedChange], None]] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``; raises if not started."""
        if self._url is None:
            raise RuntimeError("sandbox is not running")
        return self._url

    @property
    def token_url(self) -> str:
        """Full URL of the token endpoint."""
        return self.url + TOKEN_PATH

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("sandbox already started")
        # access_log=None: benchmarks send thousands of requests; a line each is noise.
        # shutdown_timeout: a delayed handler must not hold stop() for aiohttp's 60 s.
        self._runner, bound_host, bound_port = await start_server(
            self._build_app(), host, port, access_log=None, shutdown_timeout=1.0
        )
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}"
        return self._url

    async def listen_also(self, host: str = "127.0.0.1") -> int:
        """Serve the same API on one more free port, and return it: each client given
        a port of its own is told apart by ``AppliedChange.port``."""
        runner = self._runner
        if runner is None:
            raise RuntimeError("sandbox is not running")
        before = {tuple(address[:2]) for address in runner.addresses}
        site = web.TCPSite(runner, host, 0)
        await site.start()
        added = [a for a in runner.addresses if tuple(a[:2]) not in before]
        port: int = added[0][1]
        return port

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        runner, self._runner = self._runner, None
        self._url = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> WalkMeSandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        router = app.router
        router.add_post(TOKEN_PATH, self._handle_token)
        router.add_post(SEGMENTS_PATH, self._handle_create)
        router.add_get(SEGMENTS_PATH, self._handle_list, allow_head=False)
        router.add_put(SEGMENT_PATH, self._handle_update)
        router.add_delete(SEGMENT_PATH, self._handle_delete)
        router.add_get("/_sandbox/state", self._handle_state, allow_head=False)
        router.add_get("/_sandbox/faults", self._handle_get_faults, allow_head=False)
        router.add_post("/_sandbox/faults", self._handle_set_faults)
        router.add_post("/_sandbox/revoke", self._handle_revoke)
        router.add_post("/_sandbox/script", self._handle_script)
        return app

    # ------------------------------------------------------------ test controls

    @property
    def faults(self) -> Faults:
        """Current faults; assigning a new ``Faults`` reseeds the random source."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        with self._lock:
            self._faults = value
            self._rng = random.Random(value.seed)

    def revoke_tokens(self) -> None:
        """Invalidate every token issued so far (they answer 401 before expiring)."""
        with self._lock:
            self._tokens.clear()

    def script(
        self,
        status: int,
        times: int = 1,
        retry_after: str | None = None,
        body: dict[str, Any] | str | None = None,
        *,
        on_token: bool = False,
    ) -> None:
        """Answer the next ``times`` segment calls (token calls if ``on_token``) with
        ``status`` without applying them: ``body`` as JSON, or a text sent as it is
        (``""``: no body at all). Scripts run before random faults."""
        entry = _Scripted(status=status, retry_after=retry_after, body=body)
        with self._lock:
            (self._token_script if on_token else self._script).extend([entry] * times)

    def script_drop(self, times: int = 1, *, on_token: bool = False) -> None:
        """Apply the next ``times`` segment calls, then drop their connections unanswered."""
        entry = _Scripted(status=0, drop=True)
        with self._lock:
            (self._token_script if on_token else self._script).extend([entry] * times)

    def clear_script(self) -> None:
        """Forget scripted answers not yet used."""
        with self._lock:
            self._script.clear()
            self._token_script.clear()

    def drop_after_apply(self, kind: RequestKind, times: int = 1) -> None:
        """Apply the next ``times`` calls of ``kind`` that succeed, then drop their
        connections unanswered (the ambiguous write: done, but the client never hears)."""
        with self._lock:
            self._drops_after_apply[kind] += times

    def stall_write(self, from_write: int, seconds: float) -> None:
        """Hold back the answer of the first create or update, from the
        ``from_write``-th received on (1-based, see ``writes_received``), that is
        applied and answered, for ``seconds``: a request in flight for as long as a
        test needs. It is added to ``stalled``. One request per call; replaces an
        earlier stall not yet used."""
        with self._lock:
            self._stall = _Stall(from_write, seconds)

    def cancel_stall(self) -> None:
        """Forget a stall not yet used."""
        with self._lock:
            self._stall = None

    def on_request(self, hook: Callable[[RequestKind], None]) -> None:
        """Call ``hook(kind)`` on the server's event loop as each segment call arrives,
        before faults are drawn (to change ``faults`` from then on, say)."""
        self._request_hooks.append(hook)

    def on_apply(self, hook: Callable[[AppliedChange], None]) -> None:
        """Call ``hook(change)`` on the server's event loop right after each change is
        applied and before it is answered, with no await in between: hooks see the
        changes in the order WalkMe applied them."""
        self._apply_hooks.append(hook)

    def clear_requests(self) -> None:
        """Forget the request log (e.g. after a test's setup phase)."""
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------ introspection

    @property
    def writes_received(self) -> int:
        """Creates and updates received so far, answered or not."""
        with self._lock:
            return self._writes_received

    def members(self, segment_guid: str) -> set[str]:
        """A copy of a segment's members; ``KeyError`` if there is no such segment."""
        with self._lock:
            return set(self.segments[segment_guid.lower()].members)

    def size(self, segment_guid: str) -> int:
        """Number of members, without copying them."""
        with self._lock:
            return len(self.segments[segment_guid.lower()].members)

    def find(
        self,
        name: str | None = None,
        external_id: str | None = None,
        system_guid: str | None = None,
    ) -> SegmentRecord | None:
        """The first segment matching every given criterion, or None."""
        if name is None and external_id is None:
            raise ValueError("find() needs name or external_id")
        system = system_guid.lower() if system_guid is not None else None
        with self._lock:
            for record in self.segments.values():
                if (
                    (name is None or record.name == name)
                    and (external_id is None or record.external_id == external_id)
                    and (system is None or record.system_guid == system)
                ):
                    return record
        return None

    def count(
        self,
        kind: RequestKind | None = None,
        *,
        action: str | None = None,
        status: int | None = None,
        applied: bool | None = None,
    ) -> int:
        """Number of recorded requests matching every given criterion."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (kind is None or r.kind == kind)
                and (action is None or r.action == action)
                and (status is None or r.status == status)
                and (applied is None or r.applied == applied)
            )

    def request_counts(self) -> dict[str, Any]:
        """Request totals by kind, action, status and kind+status, and applied by kind."""
        with self._lock:
            records = list(self.requests)
        by_kind_status: dict[str, Counter[str]] = {}
        for r in records:
            by_kind_status.setdefault(r.kind, Counter())[str(r.status)] += 1
        return {
            "total": len(records),
            "byKind": dict(Counter(r.kind for r in records)),
            "byAction": dict(Counter(r.action for r in records if r.action is not None)),
            "byStatus": dict(Counter(str(r.status) for r in records)),
            "byKindStatus": {k: dict(v) for k, v in by_kind_status.items()},
            "applied": dict(Counter(r.kind for r in records if r.applied)),
            "dropped": sum(1 for r in records if r.dropped),
        }

    def state(self, *, with_members: bool = False, with_requests: bool = False) -> dict[str, Any]:
        """The JSON document served at ``GET /_sandbox/state``."""
        with self._lock:
            segments = []
            for record in self.segments.values():
                item: dict[str, Any] = {
                    "guid": record.guid,
                    "name": record.name,
                    "externalId": record.external_id,
                    "systemGuid": record.system_guid,
                    "size": len(record.members),
                }
                if with_members:
                    item["members"] = sorted(record.members)
                segments.append(item)
            tokens_issued = self.tokens_issued
            log = [dataclasses.asdict(r) for r in self.requests] if with_requests else None
        doc: dict[str, Any] = {
            "segments": segments,
            "requests": self.request_counts(),
            "tokensIssued": tokens_issued,
            "faults": self._faults.to_dict(),
        }
        if log is not None:
            doc["requestLog"] = log
        return doc

    # ------------------------------------------------------------ request flow

    def _record(self, request: web.Request, call: _Call, response: web.Response) -> None:
        record = RequestRecord(
            kind=call.kind,
            method=request.method,
            path=request.path,
            action=call.action,
            n_ids=call.n_ids,
            status=0 if call.drop else response.status,
            applied=call.applied,
            dropped=call.drop,
            retry_after=response.headers.get("Retry-After"),
        )
        with self._lock:
            self.requests.append(record)

    async def _inject_faults(self, call: _Call) -> None:
        """Delay, then raise ``_Answer`` for a scripted or random fault, or mark a drop."""
        faults = self._faults
        on_token = call.kind == "token"
        if on_token and not faults.faults_on_token:
            # Scripts for the token call are opt-in per entry, so they always apply.
            with self._lock:
                scripted = self._token_script.popleft() if self._token_script else None
            if scripted is not None:
                self._apply_script(call, scripted)
            return
        if faults.delay > 0:
            await asyncio.sleep(faults.delay)
        queue = self._token_script if on_token else self._script
        with self._lock:
            scripted = queue.popleft() if queue else None
        if scripted is not None:
            # Scripted answers take no random draws, so they leave the seeded sequence alone.
            self._apply_script(call, scripted)
            return
        with self._lock:
            # Draw under the lock: requests served from another thread share the RNG.
            rng = self._rng
            error = faults.error_rate > 0 and rng.random() < faults.error_rate
            error_status = rng.choice(_SERVER_ERRORS) if error else 0
            throttle = (
                not error and faults.throttle_rate > 0 and rng.random() < faults.throttle_rate
            )
            http_date = faults.retry_after_http_date
            if throttle and http_date is None:
                http_date = rng.random() < 0.5
        if error:
            raise _Answer(self._server_error(error_status))
        if throttle:
            raise _Answer(self._throttled(faults.retry_after, bool(http_date)))

    def _apply_script(self, call: _Call, scripted: _Scripted) -> None:
        if scripted.drop:
            call.drop = True
            return
        headers = None if scripted.retry_after is None else {"Retry-After": scripted.retry_after}
        if isinstance(scripted.body, str):
            raise _Answer(
                web.Response(
                    text=scripted.body,
                    status=scripted.status,
                    content_type="text/plain",
                    headers=headers,
                )
            )
        if scripted.body is not None:
            raise _Answer(web.json_response(scripted.body, status=scripted.status, headers=headers))
        if scripted.status == 502:
            raise _Answer(self._server_error(502, headers))
        body = {"error": f"scripted_{scripted.status}"}
        raise _Answer(web.json_response(body, status=scripted.status, headers=headers))

    @staticmethod
    def _server_error(status: int, headers: dict[str, str] | None = None) -> web.Response:
        if status == 502:
            return web.Response(
                status=502, text=_BAD_GATEWAY_HTML, content_type="text/html", headers=headers
            )
        error = "service_unavailable" if status == 503 else "internal_error"
        return web.json_response({"error": error}, status=status, headers=headers)

    @staticmethod
    def _throttled(retry_after: float, http_date: bool) -> web.Response:
        if http_date:
            # HTTP-dates have whole seconds; round up so the client never retries early.
            value = email.utils.formatdate(math.ceil(time.time() + retry_after), usegmt=True)
        else:
            value = _format_seconds(retry_after)
        return web.json_response(
            {"error": "too_many_requests", "message": "rate limit exceeded"},
            status=429,
            headers={"Retry-After": value},
        )

    def _roll_drop(self, call: _Call, status: int) -> None:
        faults = self._faults
        if call.drop or status >= 400 or faults.drop_rate <= 0:
            return
        if call.kind == "token" and not faults.faults_on_token:
            return
        with self._lock:
            call.drop = self._rng.random() < faults.drop_rate

    def _finish(self, request: web.Request, call: _Call, response: web.Response) -> web.Response:
        if call.applied and not call.drop:
            with self._lock:
                if self._drops_after_apply[call.kind] > 0:
                    self._drops_after_apply[call.kind] -= 1
                    call.drop = True
        self._roll_drop(call, response.status)
        self._record(request, call, response)
        if call.drop:
            # Closing the transport makes aiohttp's write fail as a client disconnect,
            # which it ignores quietly; the client sees the server hang up unanswered.
            transport = request.transport
            if transport is not None:
                transport.close()
        return response

    def _applied(self, request: web.Request, call: _Call, change: AppliedChange) -> None:
        call.applied = True
        call.change = change
        for hook in self._apply_hooks:
            hook(change)

    def _take_stall(self, call: _Call, response: web.Response) -> float | None:
        """The seconds to hold this answer back, if a stall is armed for it."""
        change = call.change
        with self._lock:
            stall = self._stall
            if (
                stall is None
                or change is None
                or call.write_number is None
                or call.write_number < stall.from_write
                or call.drop
                or response.status >= 300
            ):
                return None
            self._stall = None
            self.stalled.append(change)
        return stall.seconds

    async def _segment_call(
        self,
        request: web.Request,
        kind: RequestKind,
        operation: Callable[[web.Request, _Call, str, bytes], web.Response],
    ) -> web.Response:
        call = _Call(kind)
        if kind in ("create", "update"):
            with self._lock:
                self._writes_received += 1
                call.write_number = self._writes_received
        for hook in self._request_hooks:
            hook(kind)
        # Read the body even when a fault answers: an unread body would break keep-alive.
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            too_large = {"error": "payload_too_large", "maxBytes": self.max_body_bytes}
            return self._finish(request, call, web.json_response(too_large, status=413))
        try:
            await self._inject_faults(call)
            self._authorize(request)
            system = request.match_info["system_guid"].lower()
            if system not in self.systems:
                raise _error(404, "not_found", "unknown system")
            # Synchronous from here on: the change is atomic on the event loop.
            response = operation(request, call, system, raw)
        except _Answer as answer:
            response = answer.response
        response = self._finish(request, call, response)
        stall_s = self._take_stall(call, response)
        if stall_s is not None:
            await asyncio.sleep(stall_s)
        return response

    def _authorize(self, request: web.Request) -> None:
        """Raise 401 for a missing, unknown, expired or revoked token; 403 if forbidden."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        entry = None
        if scheme.lower() == "bearer" and token:
            with self._lock:
                entry = self._tokens.get(token)
        if entry is None or entry.expires_at <= time.monotonic():
            raise _Answer(
                web.json_response(
                    {"error": "invalid_token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            )
        if entry.client_id in self.forbidden_clients:
            raise _error(403, "forbidden", "client is not allowed to use the Segments API")

    @staticmethod
    def _segment_guid(request: web.Request) -> str:
        guid = request.match_info["segment_guid"]
        if not _GUID_RE.match(guid):
            raise _validation_error("segmentGuid must be a hyphenated GUID")
        return guid.lower()

    def _user_ids(self, body: Mapping[str, Any], call: _Call) -> set[str]:
        """Validate ``userIds`` like WalkMe does and return them as a set."""
        ids = body.get("userIds")
        if not isinstance(ids, list):
            raise _validation_error("userIds must be a list of strings")
        call.n_ids = len(ids)
        if len(ids) > self.max_ids:
            raise _validation_error(f"at most {self.max_ids} userIds per request")
        limit = self.max_id_len
        # Fast path in C (map/min/max); the per-id scan runs only to name offenders.
        if ids and (
            set(map(type, ids)) != {str} or min(map(len, ids)) == 0 or max(map(len, ids)) > limit
        ):
            bad = (u for u in ids if not isinstance(u, str) or not u or len(u) > limit)
            raise _validation_error(
                f"userIds must be non-empty strings of at most {limit} characters", bad
            )
        members = set(ids)
        rejected = self.rejected_ids
        if rejected and not members.isdisjoint(rejected):
            hit = members & rejected
            raise _validation_error("some userIds were rejected", (u for u in ids if u in hit))
        return members

    # ----------------------------------------------------------------- handlers

    async def _handle_token(self, request: web.Request) -> web.Response:
        call = _Call("token")
        form = await request.post()
        try:
            await self._inject_faults(call)
            scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            client_id, sep, secret = decoded.partition(":")
            good = (
                scheme.lower() == "basic"
                and bool(sep)
                # Constant-time compares, as a real token server would do.
                and hmac.compare_digest(client_id.encode(), self.client_id.encode())
                and hmac.compare_digest(secret.encode(), self.client_secret.encode())
            )
            if not good:
                raise _Answer(
                    web.json_response(
                        {"error": "invalid_client"},
                        status=401,
                        headers={"WWW-Authenticate": 'Basic realm="walkme"'},
                    )
                )
            grant = form.get("grant_type")
            if grant is None:
                raise _error(400, "invalid_request", "grant_type is required")
            if grant != "client_credentials":
                raise _error(400, "unsupported_grant_type")
            token = secrets.token_urlsafe(32)  # 43 characters, opaque like the real one
            lifetime = self.token_lifetime
            now = time.monotonic()
            with self._lock:
                # Forget expired tokens so long benchmarks do not grow the table.
                self._tokens = {t: e for t, e in self._tokens.items() if e.expires_at > now}
                self._tokens[token] = _Token(client_id=client_id, expires_at=now + lifetime)
                self.tokens_issued += 1
                self.issued_tokens.append(token)
            call.applied = True
            response = web.json_response(
                {
                    "access_token": token,
                    "expires_in": int(lifetime),
                    "token_type": "Bearer",
                    "scope": "segments:write segments:read",
                },
                headers={"Cache-Control": "no-store"},
            )
        except _Answer as answer:
            response = answer.response
        return self._finish(request, call, response)

    async def _handle_create(self, request: web.Request) -> web.Response:
        return await self._segment_call(request, "create", self._create)

    async def _handle_update(self, request: web.Request) -> web.Response:
        return await self._segment_call(request, "update", self._update)

    async def _handle_list(self, request: web.Request) -> web.Response:
        return await self._segment_call(request, "list", self._list)

    async def _handle_delete(self, request: web.Request) -> web.Response:
        return await self._segment_call(request, "delete", self._delete)

    def _create(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        body = _parse_object(raw)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _validation_error("name must be a non-empty string")
        external_id = body.get("id")
        if external_id is not None and (not isinstance(external_id, str) or not external_id):
            raise _validation_error("id must be a non-empty string when given")
        members = self._user_ids(body, call)
        record = SegmentRecord(
            guid=str(uuid.uuid4()),
            system_guid=system,
            name=name,
            external_id=external_id,
            members=members,
        )
        with self._lock:
            if external_id is not None and any(
                s.external_id == external_id and s.system_guid == system
                for s in self.segments.values()
            ):
                raise _error(409, "conflict", f"external id {external_id!r} is already in use")
            self.segments[record.guid] = record
        self._applied(
            request,
            call,
            AppliedChange("create", record.guid, tuple(body["userIds"]), _local_port(request)),
        )
        if not self.create_returns_guid:
            return web.json_response({"success": True}, status=201)
        return web.json_response(record.public(), status=201)

    def _update(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        guid = self._segment_guid(request)
        body = _parse_object(raw)
        action = body.get("action")
        if isinstance(action, str):
            call.action = action
        if action not in _ACTIONS:
            raise _validation_error('action must be one of "add", "remove", "override"')
        ids = self._user_ids(body, call)
        with self._lock:
            record = self.segments.get(guid)
            if record is None or record.system_guid != system:
                raise _error(404, "not_found", "unknown segment")
            if action == "add":
                record.members |= ids
            elif action == "remove":
                record.members -= ids
            else:
                record.members = ids
        self._applied(
            request, call, AppliedChange(action, guid, tuple(body["userIds"]), _local_port(request))
        )
        return web.json_response({"success": True})

    def _list(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        with self._lock:
            items = [s.public() for s in self.segments.values() if s.system_guid == system]
        if self.list_shape == "bare":
            return web.json_response(items)
        return web.json_response({self.list_shape: items})

    def _delete(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        guid = self._segment_guid(request)
        with self._lock:
            record = self.segments.get(guid)
            if record is None or record.system_guid != system:
                raise _error(404, "not_found", "unknown segment")
            del self.segments[guid]
        self._applied(request, call, AppliedChange("delete", guid, (), _local_port(request)))
        return web.json_response({"success": True})

    # ------------------------------------------------ control plane (not recorded)

    async def _handle_state(self, request: web.Request) -> web.Response:
        flags = request.query
        return web.json_response(
            self.state(
                with_members=flags.get("members") in ("1", "true"),
                with_requests=flags.get("requests") in ("1", "true"),
            )
        )

    async def _handle_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults.to_dict())

    async def _handle_set_faults(self, request: web.Request) -> web.Response:
        """Replace the faults; omitted fields take their defaults."""
        try:
            body = _parse_object(await request.read())
            faults = Faults.from_dict(body)
        except _Answer as answer:
            return answer.response
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": "validation_error", "message": str(exc)}, status=400)
        self.faults = faults
        return web.json_response(faults.to_dict())

    async def _handle_revoke(self, request: web.Request) -> web.Response:
        self.revoke_tokens()
        return web.json_response({"success": True})

    async def _handle_script(self, request: web.Request) -> web.Response:
        """Body: ``{"status": int, "times": int, "retryAfter": str, "body": {...},
        "drop": bool, "onToken": bool}``; all but ``status`` optional."""
        try:
            body = _parse_object(await request.read())
        except _Answer as answer:
            return answer.response
        status, times = body.get("status", 0), body.get("times", 1)
        retry_after, reply = body.get("retryAfter"), body.get("body")
        drop, on_token = body.get("drop", False), body.get("onToken", False)
        valid = (
            isinstance(times, int)
            and times >= 0
            and isinstance(drop, bool)
            and isinstance(on_token, bool)
            and (drop or (isinstance(status, int) and 100 <= status <= 599))
            and (retry_after is None or isinstance(retry_after, str))
            and (reply is None or isinstance(reply, dict))
        )
        if not valid:
            return web.json_response(
                {"error": "validation_error", "message": "invalid script"}, status=400
            )
        if drop:
            self.script_drop(times, on_token=on_token)
        else:
            self.script(status, times, retry_after, reply, on_token=on_token)
        return web.json_response({"success": True})


def _local_port(request: web.Request) -> int:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if sockname:
        return int(sockname[1])
    return int(request.url.port or 0)
