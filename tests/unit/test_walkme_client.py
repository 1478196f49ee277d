"""``WalkMeClient`` against a tiny scripted WalkMe on 127.0.0.1: tokens, 401/403, retries."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
import stamina
import structlog
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from stamina.instrumentation import RetryDetails

from syncd import metrics, walkme
from syncd.logs import redact_credentials, scrub
from syncd.walkme import (
    WalkMeAuthError,
    WalkMeClient,
    WalkMeError,
    WalkMeNotFound,
    WalkMeRejected,
    WalkMeTooLarge,
    WalkMeUnavailable,
    create_key,
)
from tests.support.logs import named
from tests.support.net import BareHttpServer

SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
CLIENT_ID = "client-1"
SECRET = "TOPSECRET-9f8e7d6c5b4a"
TOKEN_PATH = "/accounts/connect/token"
SEGMENTS = f"/public/v1/user/system/{SYSTEM}/segment"
E = TypeVar("E", bound=WalkMeError)


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": "scripted"}'
    content_type: str = "application/json"


@dataclass
class Seen:
    method: str
    path: str
    authorization: str
    at: float
    body: bytes


class FakeWalkMe:
    """Issues tokens, checks them, and answers scripted replies first when there are any."""

    def __init__(self) -> None:
        self.expires_in: float = 86400
        self.token_type = "Bearer"
        self.token_delay = 0.0
        self.token_script: deque[Reply] = deque()
        self.script: deque[Reply] = deque()
        self.valid: set[str] = set()
        self.issued = 0
        self.token_requests: list[tuple[str, dict[str, str]]] = []
        self.calls: list[Seen] = []
        self.headers: list[dict[str, str]] = []  # of each segment call, in order
        self.segments: list[dict[str, Any]] = [{"segmentGuid": GUID, "name": "vip"}]
        self.server: TestServer | None = None
        self.elsewhere: list[Seen] = []  # requests that followed a redirect
        self.cut_short = 0  # answer this many segment calls with a body cut short
        self.cut_how: CutShort = "length"
        self.echo: int | None = None  # answer segment calls with this status, echoing them
        self.token_echo: int | None = None  # the same for the token call
        self.delay = 0.0  # seconds each segment call waits before answering
        self.hang_up = 0  # close the connection of this many segment calls unanswered

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def revoke(self) -> None:
        self.valid.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self.token)
        app.router.add_route("*", SEGMENTS, self.segment)
        app.router.add_route("*", SEGMENTS + "/{guid}", self.segment)
        app.router.add_route("*", "/elsewhere/{tail:.*}", self.redirected)
        return app

    async def redirected(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = Seen(request.method, request.path, request.headers.get("Authorization", ""), 0, body)
        self.elsewhere.append(seen)
        return web.json_response({"success": True, "segmentGuid": GUID, "access_token": "x"})

    @staticmethod
    def answer(reply: Reply) -> web.Response:
        return web.Response(
            status=reply.status,
            text=reply.body,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests.append(
            (request.headers.get("Authorization", ""), {k: str(v) for k, v in form.items()})
        )
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self.token_echo is not None:
            return web.json_response(echoed(request, await request.read()), status=self.token_echo)
        if self.token_script:
            return self.answer(self.token_script.popleft())
        self.issued += 1
        value = f"token-{self.issued}"
        self.valid.add(value)
        return web.json_response(
            {"access_token": value, "expires_in": self.expires_in, "token_type": self.token_type}
        )

    async def segment(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        body = await request.read()
        loop_time = asyncio.get_running_loop().time()
        self.calls.append(Seen(request.method, request.path, authorization, loop_time, body))
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hang_up:
            self.hang_up -= 1
            assert request.transport is not None
            request.transport.close()  # no answer at all
            return web.StreamResponse()
        if self.echo is not None:
            return web.json_response(echoed(request, body), status=self.echo)
        if self.cut_short:
            self.cut_short -= 1
            return await answer_cut_short(request, self.cut_how)
        if self.script:
            return self.answer(self.script.popleft())
        if authorization.removeprefix("Bearer ") not in self.valid:
            return web.json_response({"error": "invalid_token"}, status=401)
        if request.method == "GET":
            return web.json_response({"data": self.segments})
        if request.method == "POST":
            return web.json_response({"segmentGuid": GUID, "name": "new"}, status=201)
        return web.json_response({"success": True})


def echoed(request: web.Request, body: bytes) -> dict[str, Any]:
    """What a careless server answers: the request, headers and all."""
    return {
        "error": "echo",
        "headers": dict(request.headers),
        "body": body.decode(errors="replace"),
    }


CutShort = Literal["length", "chunked", "gzip"]


async def answer_cut_short(request: web.Request, how: CutShort) -> web.StreamResponse:
    """A 200 whose body breaks off (a proxy dying mid-answer): fewer bytes than its
    Content-Length, a chunked body without its last chunk, or half a gzip stream
    (which aiohttp reads without complaint: only the JSON is found wanting)."""
    if how == "gzip":
        whole = gzip.compress(b'{"success": true, "padding": "' + b"x" * 2000 + b'"}')
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=whole[: len(whole) // 2], headers=headers)
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    if how == "length":
        response.content_length = 100
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"succ')
    assert request.transport is not None
    request.transport.close()
    return response


@pytest.fixture
async def fake() -> AsyncIterator[FakeWalkMe]:
    walkme_fake = FakeWalkMe()
    server = TestServer(walkme_fake.app(), host="127.0.0.1")
    async with server:
        walkme_fake.server = server
        yield walkme_fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client_session:
        yield client_session


def make_client(
    fake: FakeWalkMe | str,
    session: aiohttp.ClientSession,
    *,
    attempts: int = 4,
    max_wait: float = 0.02,
) -> WalkMeClient:
    """A client of the fake, or of any server at a URL, waiting at most ``max_wait``."""
    url = fake if isinstance(fake, str) else fake.url
    return WalkMeClient(
        session,
        api_url=url,
        token_url=url + TOKEN_PATH,
        client_id=CLIENT_ID,
        client_secret=SecretStr(SECRET),
        attempts=attempts,
        max_wait=max_wait,
    )


class Clock:
    """Stands in for the ``time`` module inside ``syncd.walkme``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake_clock = Clock()
    monkeypatch.setattr(walkme, "time", fake_clock)
    return fake_clock


def bearer(seen: Seen) -> str:
    return seen.authorization.removeprefix("Bearer ")


async def revoked_client(fake: FakeWalkMe, session: aiohttp.ClientSession) -> WalkMeClient:
    """A client holding a token that WalkMe has since revoked."""
    client = make_client(fake, session)
    await client.access_token()
    fake.revoke()
    return client


async def failure(
    fake: FakeWalkMe,
    session: aiohttp.ClientSession,
    kind: str,
    error: type[E],
    *replies: Reply,
    match: str | None = None,
    attempts: int = 4,
) -> E:
    """What a ``kind`` call (as ``call`` makes it) raises, an ``error``, when WalkMe answers
    ``replies`` first (for the token call: its token endpoint)."""
    (fake.token_script if kind == "token" else fake.script).extend(replies)
    with pytest.raises(error, match=match) as info:
        await call(make_client(fake, session, attempts=attempts), kind)
    return info.value


# -- the token -----------------------------------------------------------------------


async def test_token_request_is_client_credentials(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    assert await client.access_token() == "token-1"
    [(authorization, form)] = fake.token_requests
    expected = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    assert authorization == f"Basic {expected}"
    assert form == {"grant_type": "client_credentials"}


async def test_token_cached_across_requests(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    for _ in range(5):
        [segment] = await client.list_segments(SYSTEM)
        assert segment.guid == GUID
        assert segment.name == "vip"
    await client.update_segment(SYSTEM, GUID, "add", ["a@x.com"])
    assert len(fake.token_requests) == 1
    assert {bearer(seen) for seen in fake.calls} == {"token-1"}
    assert client.token_refreshes == 1


async def test_token_refreshed_before_expiry(
    fake: FakeWalkMe, session: aiohttp.ClientSession, clock: Clock
) -> None:
    fake.expires_in = 100  # refreshed a tenth early: after 90 s
    client = make_client(fake, session)
    await client.list_segments(SYSTEM)
    clock.now += 89
    await client.list_segments(SYSTEM)
    assert len(fake.token_requests) == 1
    clock.now += 2  # 91 s: still valid at WalkMe for 9 s, but refreshed now
    await client.list_segments(SYSTEM)
    assert len(fake.token_requests) == 2
    assert [bearer(seen) for seen in fake.calls] == ["token-1", "token-1", "token-2"]


async def test_long_token_refreshed_at_most_five_minutes_early(
    fake: FakeWalkMe, session: aiohttp.ClientSession, clock: Clock
) -> None:
    fake.expires_in = 86400
    client = make_client(fake, session)
    await client.access_token()
    clock.now += 86400 - 301
    assert await client.access_token() == "token-1"
    clock.now += 2
    assert await client.access_token() == "token-2"


async def test_concurrent_requests_share_one_refresh(
    fake: FakeWalkMe, session: aiohttp.ClientSession, clock: Clock
) -> None:
    fake.expires_in = 100
    client = make_client(fake, session)
    await client.list_segments(SYSTEM)
    clock.now += 1000  # expired
    fake.token_delay = 0.05  # every caller arrives while the refresh is in flight
    results = await asyncio.gather(*(client.list_segments(SYSTEM) for _ in range(20)))
    assert all(len(segments) == 1 for segments in results)
    assert len(fake.token_requests) == 2  # the first token, then exactly one refresh
    assert {bearer(seen) for seen in fake.calls[1:]} == {"token-2"}


async def test_concurrent_first_requests_share_one_token(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.token_delay = 0.05
    client = make_client(fake, session)
    await asyncio.gather(*(client.list_segments(SYSTEM) for _ in range(20)))
    assert len(fake.token_requests) == 1


async def test_lowercase_bearer_token_type(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.token_type = "bearer"
    assert await make_client(fake, session).access_token() == "token-1"


async def test_unsupported_token_type(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    fake.token_type = "mac"
    with pytest.raises(WalkMeError, match="token_type"):
        await make_client(fake, session).access_token()


async def test_token_answer_without_access_token(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    reply = Reply(200, body='{"expires_in": 3600}')
    await failure(fake, session, "token", WalkMeError, reply, match="access_token")


# -- 401 and 403 ---------------------------------------------------------------------


async def test_401_refreshes_once_and_retries(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    await client.list_segments(SYSTEM)
    fake.revoke()  # e.g. the key was rotated: old tokens die early
    [segment] = await client.list_segments(SYSTEM)
    assert segment.guid == GUID
    assert len(fake.token_requests) == 2
    assert [bearer(seen) for seen in fake.calls] == ["token-1", "token-1", "token-2"]


async def test_401_on_update_is_retried_with_the_same_body(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = await revoked_client(fake, session)
    await client.update_segment(SYSTEM, GUID.replace("-", ""), "remove", ["a", "b"])
    first, second = fake.calls
    assert first.body == second.body
    assert json.loads(second.body) == {"action": "remove", "userIds": ["a", "b"]}
    assert second.method == "PUT"
    assert second.path == f"{SEGMENTS}/{GUID}"


async def test_401_twice_is_an_auth_error(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    replies = [Reply(401), Reply(401), Reply(200, body="[]")]
    error = await failure(fake, session, "list", WalkMeAuthError, *replies)
    assert error.status == 401
    assert len(fake.calls) == 2  # one retry with a fresh token, no more
    assert len(fake.token_requests) == 2
    assert SECRET not in str(error)


async def test_many_concurrent_401s_share_one_refresh(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = await revoked_client(fake, session)
    fake.token_delay = 0.05
    await asyncio.gather(*(client.list_segments(SYSTEM) for _ in range(20)))
    assert len(fake.token_requests) == 2


async def test_403_is_an_auth_error_naming_segments_api(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    error = await failure(
        fake, session, "list", WalkMeAuthError, Reply(403, body='{"error": "forbidden"}')
    )
    assert "Segments API" in str(error)
    assert error.status == 403
    assert len(fake.calls) == 1  # not retried
    assert len(fake.token_requests) == 1  # and no refresh: the token is fine


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_token_refused_is_an_auth_error_naming_the_secret_variable(
    fake: FakeWalkMe, session: aiohttp.ClientSession, status: int
) -> None:
    fake.token_script.append(Reply(status, body='{"error": "invalid_client"}'))
    with pytest.raises(WalkMeAuthError) as info:
        await make_client(fake, session).list_segments(SYSTEM)
    assert "SYNCD_WALKME_CLIENT_SECRET" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    assert len(fake.token_requests) == 1  # a wrong key is not retried
    assert fake.calls == []


def test_client_repr_names_the_client_and_hides_the_secret() -> None:
    """Its repr says which API and client id it is (what a log reader needs) and
    never the secret."""

    async def build() -> str:
        async with aiohttp.ClientSession() as client_session:
            client = WalkMeClient(
                client_session,
                api_url="https://api.walkme.com",
                token_url="https://api.walkme.com/accounts/connect/token",
                client_id=CLIENT_ID,
                client_secret=SecretStr(SECRET),
            )
            return repr(client)

    shown = asyncio.run(build())
    assert shown == f"<WalkMeClient https://api.walkme.com client_id={CLIENT_ID}>"
    assert SECRET not in shown


def test_the_client_has_its_basic_credential_scrubbed_even_bare() -> None:
    """Not only the secret: the Basic credential made of its own client id too."""
    client_id, secret = "client-only-here", "secret-only-here-5e1f"
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()

    async def build() -> None:
        async with aiohttp.ClientSession() as client_session:
            WalkMeClient(
                client_session,
                api_url="https://api.walkme.com",
                token_url="https://api.walkme.com/accounts/connect/token",
                client_id=client_id,
                client_secret=SecretStr(secret),
            )

    asyncio.run(build())
    assert basic not in scrub(f"echoed: {basic}")


# -- retries -------------------------------------------------------------------------


async def test_429_honours_retry_after(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    # Without Retry-After the first wait is at least 0.5 s (wait_initial).
    fake.script.append(Reply(429, {"Retry-After": "0.2"}))
    client = make_client(fake, session, max_wait=5.0)
    [segment] = await client.list_segments(SYSTEM)
    assert segment.guid == GUID
    first, second = fake.calls
    gap = second.at - first.at
    assert 0.19 <= gap < 0.45, gap


async def test_retry_after_capped_by_max_wait(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.append(Reply(429, {"Retry-After": "3600"}))
    started = time.monotonic()
    await make_client(fake, session, max_wait=0.1).list_segments(SYSTEM)
    assert time.monotonic() - started < 2.0
    assert len(fake.calls) == 2


async def test_server_errors_retried_then_success(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.extend(
        [
            Reply(500),
            Reply(502, body="<html>502 Bad Gateway</html>", content_type="text/html"),
            Reply(503),
            Reply(504, body=""),
        ]
    )
    client = make_client(fake, session, attempts=5)
    [segment] = await client.list_segments(SYSTEM)
    assert segment.guid == GUID
    assert len(fake.calls) == 5
    assert len(fake.token_requests) == 1


async def test_attempts_exhausted(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    error = await failure(fake, session, "list", WalkMeUnavailable, *[Reply(503)] * 10, attempts=3)
    assert error.status == 503
    assert len(fake.calls) == 3


async def test_throttled_until_attempts_exhausted(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    replies = [Reply(429, {"Retry-After": "0.01"})] * 10
    await failure(fake, session, "update", WalkMeUnavailable, *replies, attempts=4)
    assert len(fake.calls) == 4


@pytest.mark.parametrize("status", [400, 409, 413, 422])
async def test_client_errors_not_retried(
    fake: FakeWalkMe, session: aiohttp.ClientSession, status: int
) -> None:
    reply = Reply(status, body='{"message": "userIds: bad"}')
    error = await failure(fake, session, "update", WalkMeError, reply)
    assert not isinstance(error, WalkMeUnavailable | WalkMeAuthError)
    assert error.status == status
    assert len(fake.calls) == 1


async def test_404_not_retried(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    await failure(fake, session, "update", WalkMeNotFound, Reply(404))
    assert len(fake.calls) == 1


async def test_token_call_server_error_is_retried(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    # The token endpoint is as flaky as the rest of the API.
    fake.token_script.extend([Reply(503), Reply(429, {"Retry-After": "0.01"})])
    [segment] = await make_client(fake, session, attempts=4).list_segments(SYSTEM)
    assert segment.guid == GUID
    assert len(fake.token_requests) == 3


async def test_connection_refused_is_unavailable(session: aiohttp.ClientSession) -> None:
    # A port nothing listens on: bind one, learn it, close it.
    probe = TestServer(web.Application(), host="127.0.0.1")
    await probe.start_server()
    url = str(probe.make_url("")).rstrip("/")
    await probe.close()
    client = make_client(url, session, attempts=2, max_wait=0.01)
    with pytest.raises(WalkMeUnavailable):
        await client.access_token()


# -- request shapes ------------------------------------------------------------------


async def test_create_sends_name_external_id_and_ids(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", "ext-1", ["a", "b"])
    assert guid == GUID
    [seen] = fake.calls
    assert seen.method == "POST"
    assert seen.path == SEGMENTS
    assert json.loads(seen.body) == {"name": "new", "id": "ext-1", "userIds": ["a", "b"]}


@pytest.mark.parametrize(
    "payload",
    [
        [{"guid": GUID, "name": "vip"}],
        {"segments": [{"id": GUID, "name": "vip"}]},
        {"items": [{"segmentId": GUID.replace("-", ""), "name": "vip"}]},
        {"results": [{"guid": GUID, "name": "vip"}, {"name": "no guid"}]},
    ],
)
async def test_list_shapes(fake: FakeWalkMe, session: aiohttp.ClientSession, payload: Any) -> None:
    fake.script.append(Reply(200, body=json.dumps(payload)))
    [segment] = await make_client(fake, session).list_segments(SYSTEM)
    assert segment.guid == GUID
    assert segment.name == "vip"


# -- only a real acknowledgement is one ------------------------------------------------

CALLS = ["token", "list", "create", "update", "delete"]


async def call(client: WalkMeClient, kind: str) -> None:
    if kind == "token":
        await client.access_token()
    elif kind == "list":
        await client.list_segments(SYSTEM)
    elif kind == "create":
        await client.create_segment(SYSTEM, "new", "ext-1", ["a"])
    elif kind == "update":
        await client.update_segment(SYSTEM, GUID, "add", ["a"])
    else:
        await client.delete_segment(SYSTEM, GUID)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("kind", CALLS)
async def test_redirect_is_never_followed_and_names_its_location(
    fake: FakeWalkMe, session: aiohttp.ClientSession, kind: str, status: int
) -> None:
    """Neither ids nor credentials go where a 3xx points; the error says where."""
    location = fake.url + "/elsewhere/segment"
    reply = Reply(status, headers={"Location": location}, body="")
    (fake.token_script if kind == "token" else fake.script).append(reply)
    with pytest.raises(WalkMeError) as info:
        await call(make_client(fake, session), kind)
    assert not isinstance(info.value, WalkMeUnavailable)  # not retried: a setting is wrong
    assert info.value.status == status
    assert location in str(info.value)
    setting = "SYNCD_WALKME_TOKEN_URL" if kind == "token" else "SYNCD_WALKME_API_URL"
    assert setting in str(info.value)
    assert fake.elsewhere == []
    assert len(fake.calls) == (0 if kind == "token" else 1)


NOT_ACKNOWLEDGEMENTS = [
    pytest.param(Reply(200, body="<html>Sign in</html>", content_type="text/html"), id="html"),
    pytest.param(Reply(200, body='{"success": true}', content_type="text/html"), id="html-json"),
    pytest.param(Reply(200, body="OK", content_type="text/plain"), id="not-json"),
    pytest.param(Reply(200, body='{"error": "quota exceeded"}'), id="json-error"),
    pytest.param(Reply(200, body='{"success": false}'), id="success-false"),
    pytest.param(Reply(200, body='{"status": "failed"}'), id="status-failed"),
    pytest.param(Reply(200, body='["a"]'), id="array"),
    pytest.param(Reply(200, body='"done"'), id="string"),
    pytest.param(Reply(203, body='{"success": true}'), id="203"),
    pytest.param(Reply(206, body='{"success": true}'), id="206"),
    pytest.param(Reply(200, body="<?xml version='1.0'?><ok/>", content_type="text/xml"), id="xml"),
]


@pytest.mark.parametrize("reply", NOT_ACKNOWLEDGEMENTS)
async def test_update_answer_that_is_not_an_acknowledgement_is_retried_then_fails(
    fake: FakeWalkMe, session: aiohttp.ClientSession, reply: Reply
) -> None:
    error = await failure(fake, session, "update", WalkMeUnavailable, *[reply] * 3, attempts=3)
    assert len(fake.calls) == 3
    assert reply.body[:20] in str(error)  # the body's first bytes, for the operator
    assert "not an acknowledgement" in str(error)


@pytest.mark.parametrize("reply", NOT_ACKNOWLEDGEMENTS)
async def test_update_answer_that_is_not_an_acknowledgement_then_a_real_one(
    fake: FakeWalkMe, session: aiohttp.ClientSession, reply: Reply
) -> None:
    fake.script.append(reply)
    await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
    assert len(fake.calls) == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(200, body='{"success": true}'), id="200-json"),
        pytest.param(Reply(200, body=""), id="200-empty"),
        pytest.param(Reply(204, body=""), id="204"),
        pytest.param(Reply(202, body="{}"), id="202"),
        pytest.param(Reply(201, body='{"ok": true}', content_type="text/plain"), id="text-plain"),
        pytest.param(
            Reply(200, body="{}", content_type="application/vnd.walkme+json"), id="vendor-json"
        ),
    ],
)
async def test_each_form_of_acknowledgement_ends_the_retries(
    fake: FakeWalkMe, session: aiohttp.ClientSession, reply: Reply
) -> None:
    """A login page is sent again; any of these answers is WalkMe acknowledging."""
    login = Reply(200, body="<html>Sign in</html>", content_type="text/html")
    fake.script.extend([login, reply])
    await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
    assert len(fake.calls) == 2


@pytest.mark.parametrize("how", get_args(CutShort))
async def test_answers_cut_short_are_not_acknowledgements(
    fake: FakeWalkMe, session: aiohttp.ClientSession, how: CutShort
) -> None:
    fake.cut_short, fake.cut_how = 10, how
    with pytest.raises(WalkMeUnavailable):
        await make_client(fake, session, attempts=2).update_segment(SYSTEM, GUID, "add", ["a"])
    assert len(fake.calls) == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(200, body="<html>portal</html>", content_type="text/html"), id="html"),
        pytest.param(Reply(200, body=""), id="empty"),
        pytest.param(Reply(200, body='{"error": "unavailable"}'), id="json-error"),
        pytest.param(Reply(200, body='{"total": 1}'), id="no-list"),
        pytest.param(Reply(200, body="3"), id="number"),
    ],
)
async def test_list_answer_without_a_list_is_not_an_empty_list(
    fake: FakeWalkMe, session: aiohttp.ClientSession, reply: Reply
) -> None:
    """A bogus list must not read as "no such segment": syncd would create or adopt."""
    await failure(fake, session, "list", WalkMeUnavailable, *[reply] * 2, attempts=2)


async def test_empty_list_after_a_portal_page_is_an_empty_list(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    portal = Reply(200, body="<html>portal</html>", content_type="text/html")
    fake.script.extend([portal, Reply(200, body='{"data": []}')])
    assert await make_client(fake, session).list_segments(SYSTEM) == []
    assert len(fake.calls) == 2


async def test_create_answered_html_looks_up_before_resending(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.append(Reply(200, body="<html>Login</html>", content_type="text/html"))
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", "ext-1", ["a"])
    assert guid == GUID
    assert [seen.method for seen in fake.calls] == ["POST", "GET", "POST"]


async def test_create_answered_with_json_error_is_not_a_create(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.extend([Reply(200, body=f'{{"error": "denied", "segmentGuid": "{GUID}"}}')] * 4)
    with pytest.raises(WalkMeUnavailable, match="denied"):
        await make_client(fake, session, attempts=2).create_segment(SYSTEM, "new", None, ["a"])


OTHER_GUID = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"segmentGuid": GUID, "name": "someone else"}, id="other-name"),
        pytest.param({"segmentGuid": GUID, "externalId": "not-ours"}, id="other-external-id"),
        pytest.param([{"guid": GUID, "name": "a"}, {"guid": OTHER_GUID}], id="a-list"),
    ],
)
async def test_create_answer_naming_no_segment_of_ours_is_found_by_listing(
    fake: FakeWalkMe, session: aiohttp.ClientSession, answer: Any
) -> None:
    """A GUID is taken from a create answer only when it is the segment just made."""
    fake.segments.append({"segmentGuid": OTHER_GUID, "name": "new", "externalId": "ext-1"})
    fake.script.append(Reply(201, body=json.dumps(answer)))
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", "ext-1", ["a"])
    assert guid == OTHER_GUID
    assert [seen.method for seen in fake.calls] == ["POST", "GET"]


async def test_create_answer_is_read_from_its_first_wrapping_only(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.segments.append({"segmentGuid": GUID.upper(), "name": "new", "externalId": "ext-1"})
    answer = {"data": {"name": "new"}, "segments": {"segmentGuid": OTHER_GUID, "name": "new"}}
    fake.script.append(Reply(201, body=json.dumps(answer)))
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", "ext-1", ["a"])
    assert guid == GUID  # found by listing
    assert len(fake.calls) == 2


async def test_create_answer_wrapping_our_segment_is_read(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    key = create_key(SYSTEM, "new")
    answer = {"data": {"segmentGuid": OTHER_GUID, "name": "new", "id": key}}
    fake.script.append(Reply(201, body=json.dumps(answer)))
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", None, ["a"])
    assert guid == OTHER_GUID
    assert len(fake.calls) == 1


async def test_token_answer_with_an_empty_access_token_is_no_token(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    reply = Reply(200, body='{"access_token": ""}')
    await failure(fake, session, "token", WalkMeError, reply, match="access_token")
    assert fake.calls == []


async def test_token_answered_html_is_asked_again(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    portal = Reply(200, body="<html>portal</html>", content_type="text/html")
    fake.token_script.append(portal)
    assert await make_client(fake, session).access_token() == "token-1"
    assert len(fake.token_requests) == 2


async def test_413_is_too_large_and_not_retried(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    reply = Reply(413, body='{"error": "payload too large"}')
    await failure(fake, session, "update", WalkMeTooLarge, reply)
    assert len(fake.calls) == 1


# -- no secret in an error ---------------------------------------------------------------

BASIC = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()


def leaks(text: str, token: str | None = None) -> list[str]:
    forms = {"secret": SECRET, "Basic": BASIC, "URL-encoded Basic": quote(BASIC, safe="")}
    found = [name for name, form in forms.items() if form in text]
    return found + (["token"] if token and token in text else [])


@pytest.mark.parametrize("status", [400, 401, 418])
async def test_token_errors_echoing_the_request_hold_no_credential(
    fake: FakeWalkMe, session: aiohttp.ClientSession, status: int
) -> None:
    fake.token_echo = status
    with pytest.raises(WalkMeError) as info:
        await make_client(fake, session, attempts=2).access_token()
    error = info.value
    assert BASIC in fake.token_requests[0][0]  # the echo did carry it
    assert leaks(f"{error} {error!r} {error.body}") == []


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
async def test_segment_errors_echoing_the_request_hold_no_token(
    fake: FakeWalkMe, session: aiohttp.ClientSession, status: int
) -> None:
    client = make_client(fake, session, attempts=2)
    token = await client.access_token()
    fake.echo = status
    with pytest.raises(WalkMeError) as info:
        await client.update_segment(SYSTEM, GUID, "add", [SECRET])
    error = info.value
    assert leaks(f"{error} {error!r} {error.body}", token) == []
    if isinstance(error, WalkMeRejected):
        assert "echo" in error.body  # the answer is kept, only its secrets masked


def test_scrub_masks_every_form_of_a_registered_credential() -> None:
    secret = 'p/a+s s=w"rd-4bd1'  # characters that URL-encoding and JSON both change
    redact_credentials("id-7", secret)
    basic = base64.b64encode(f"id-7:{secret}".encode()).decode()
    forms = [secret, basic, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]]
    text = " | ".join(forms) + " | Authorization: Bearer abc.DEF-123_unknown"
    scrubbed = scrub(text)
    assert [form for form in forms if form in scrubbed] == []
    assert "abc.DEF-123_unknown" not in scrubbed  # a token this process never saw
    assert scrub("Basic authentication failed") == "Basic authentication failed"


# -- what each failure says, exactly (mutation testing: every word is checked) -------------


def excerpt_of(body: str) -> str:
    return scrub(body)


@pytest.mark.parametrize(
    ("replies", "kind", "error_type", "status", "message"),
    [
        pytest.param(
            [Reply(401, body="no"), Reply(401, body="still no")],
            "list",
            WalkMeAuthError,
            401,
            "WalkMe answered 401 to a fresh token: the API key may have been revoked or"
            " rotated (check SYNCD_WALKME_CLIENT_ID/SECRET)",
            id="401-twice",
        ),
        pytest.param(
            [Reply(403, body="forbidden")],
            "update",
            WalkMeAuthError,
            403,
            "WalkMe answered 403: the API key is valid but not allowed here; check that the"
            " key has the Segments API with Read and Write, and that SYNCD_WALKME_SYSTEM_GUID"
            " (or the mapping's system_guid) is right",
            id="403",
        ),
        pytest.param(
            [Reply(404, body="gone")],
            "update",
            WalkMeNotFound,
            404,
            "WalkMe answered 404 for update: gone",
            id="404",
        ),
        pytest.param(
            [Reply(400, body="bad id")],
            "update",
            WalkMeRejected,
            400,
            "WalkMe answered 400 to update: bad id",
            id="400",
        ),
        pytest.param(
            [Reply(413, body="too big")],
            "update",
            WalkMeTooLarge,
            413,
            "WalkMe answered 413 (payload too large) to update: too big",
            id="413",
        ),
        pytest.param(
            [Reply(418, body="teapot")],
            "delete",
            WalkMeError,
            418,
            "WalkMe answered HTTP 418 to delete: teapot",
            id="418",
        ),
        pytest.param(
            [Reply(399, body="odd")],
            "update",
            WalkMeError,
            399,
            "WalkMe answered HTTP 399 to update, redirecting to no Location given: syncd never"
            " follows redirects (nothing was sent there); if WalkMe moved, set"
            " SYNCD_WALKME_API_URL",
            id="3xx-without-location",
        ),
        pytest.param(
            [Reply(300, body="choices")],
            "update",
            WalkMeError,
            300,
            "WalkMe answered HTTP 300 to update, redirecting to no Location given: syncd never"
            " follows redirects (nothing was sent there); if WalkMe moved, set"
            " SYNCD_WALKME_API_URL",
            id="300",
        ),
    ],
)
async def test_each_refusal_says_what_it_was_and_keeps_the_body(
    fake: FakeWalkMe,
    session: aiohttp.ClientSession,
    replies: list[Reply],
    kind: str,
    error_type: type[WalkMeError],
    status: int,
    message: str,
) -> None:
    error = await failure(fake, session, kind, WalkMeError, *replies)
    assert type(error) is error_type
    assert str(error) == message
    assert error.status == status
    assert error.body == excerpt_of(replies[-1].body)
    assert len(fake.calls) == len(replies)  # none of these is sent again


async def test_a_404_listing_names_the_system_guid_setting(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    error = await failure(fake, session, "list", WalkMeNotFound, Reply(404, body="no system"))
    assert str(error) == (
        f"WalkMe has no system {SYSTEM} (HTTP 404 listing its segments): check"
        " SYNCD_WALKME_SYSTEM_GUID (or the mapping's system_guid), the GUID in"
        " cdn.walkme.com/users/<GUID>/; WalkMe said: no system"
    )
    assert (error.status, error.body) == (404, "no system")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(
            Reply(401, body="bad key"),
            f"WalkMe refused the API key at {{url}}{TOKEN_PATH} (HTTP 401): check"
            " SYNCD_WALKME_CLIENT_ID and SYNCD_WALKME_CLIENT_SECRET, and that the key is active",
            id="401",
        ),
        pytest.param(Reply(418, body="teapot"), "token call answered HTTP 418: teapot", id="418"),
        pytest.param(
            Reply(300, body="choices"),
            "WalkMe answered HTTP 300 to token, redirecting to no Location given: syncd never"
            " follows redirects (nothing was sent there); if WalkMe moved, set"
            " SYNCD_WALKME_TOKEN_URL",
            id="300",
        ),
        pytest.param(
            Reply(302, headers={"Location": "https://login.example/x"}, body="moved"),
            "WalkMe answered HTTP 302 to token, redirecting to https://login.example/x: syncd"
            " never follows redirects (nothing was sent there); if WalkMe moved, set"
            " SYNCD_WALKME_TOKEN_URL",
            id="302",
        ),
    ],
)
async def test_token_refusals_say_what_to_fix(
    fake: FakeWalkMe, session: aiohttp.ClientSession, reply: Reply, message: str
) -> None:
    error = await failure(fake, session, "token", WalkMeError, reply)
    assert str(error) == message.format(url=fake.url)
    assert (error.status, error.body) == (reply.status, reply.body)
    assert len(fake.token_requests) == 1


@pytest.mark.parametrize(
    ("replies", "attempts", "message"),
    [
        pytest.param(
            [Reply(503)], 1, "WalkMe update call failed once; last: server error (HTTP 503)", id="1"
        ),
        pytest.param(
            [Reply(500), Reply(429)],
            2,
            "WalkMe update call failed 2 times; last: throttled (HTTP 429)",
            id="2",
        ),
        pytest.param(
            [Reply(200, body="<p>portal</p>", content_type="text/html")],
            1,
            "WalkMe update call failed once; last: update answered HTTP 200 with Content-Type"
            " text/html, not an acknowledgement: '<p>portal</p>'",
            id="portal",
        ),
    ],
)
async def test_retries_exhausted_say_how_often_and_the_last_failure(
    fake: FakeWalkMe,
    session: aiohttp.ClientSession,
    replies: list[Reply],
    attempts: int,
    message: str,
) -> None:
    fake.script.extend(replies)
    with pytest.raises(WalkMeUnavailable) as info:
        await make_client(fake, session, attempts=attempts).update_segment(SYSTEM, GUID, "add", [])
    assert str(info.value) == message
    assert info.value.status == replies[-1].status


@pytest.mark.parametrize("kind", ["list", "create", "update", "delete"])
async def test_retries_exhausted_name_the_call(
    fake: FakeWalkMe, session: aiohttp.ClientSession, kind: str
) -> None:
    error = await failure(fake, session, kind, WalkMeUnavailable, *[Reply(503)] * 2, attempts=1)
    assert str(error) == f"WalkMe {kind} call failed once; last: server error (HTTP 503)"


async def test_token_answered_html_says_it_was_the_token_call(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    portal = Reply(200, body="<p>portal</p>", content_type="text/html")
    error = await failure(fake, session, "token", WalkMeUnavailable, portal, attempts=1)
    assert str(error) == (
        "WalkMe token call failed once; last: token answered HTTP 200 with Content-Type"
        " text/html, not an acknowledgement: '<p>portal</p>'"
    )


async def test_token_answer_without_access_token_says_so_with_its_status(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    error = await failure(fake, session, "token", WalkMeError, Reply(201, body="{}"))
    assert (str(error), error.status) == (
        "token call answered without an access_token",
        201,
    )


async def test_token_endpoint_retry_after_is_honoured(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    # Without Retry-After the first wait is at least 0.5 s (wait_initial).
    fake.token_script.append(Reply(429, {"Retry-After": "0.2"}))
    started = time.monotonic()
    await make_client(fake, session, max_wait=5.0).access_token()
    assert 0.19 <= time.monotonic() - started < 0.45
    assert len(fake.token_requests) == 2


async def test_token_call_unavailable_says_so(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    error = await failure(
        fake, session, "token", WalkMeUnavailable, Reply(502), Reply(502), attempts=2
    )
    assert str(error) == (
        "WalkMe token call failed 2 times; last: token endpoint unavailable (HTTP 502)"
    )
    assert error.status == 502


async def test_create_conflicts_say_what_to_do(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    fake.script.append(Reply(409, body="taken"))
    with pytest.raises(walkme.WalkMeConflict) as info:
        await client.create_segment(SYSTEM, "new", "ext-1", ["a"])
    assert str(info.value) == (
        "WalkMe already has a segment with external id 'ext-1' (HTTP 409) but not named"
        " 'new': set segment_guid in the mapping to adopt it, or use another external_id"
    )
    assert (info.value.status, info.value.body, info.value.guid) == (409, "taken", None)
    assert [seen.method for seen in fake.calls] == ["POST"]  # nothing looked up


async def test_create_conflict_on_our_own_key_names_the_segment_holding_it(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    key = create_key(SYSTEM, "new")
    fake.segments.append({"segmentGuid": OTHER_GUID, "name": "other", "externalId": key})
    fake.script.append(Reply(409, body="taken"))
    tally: Counter[str] = Counter()
    with pytest.raises(walkme.WalkMeConflict) as info:
        await make_client(fake, session).create_segment(SYSTEM, "new", None, ["a"], tally=tally)
    assert str(info.value) == "segment 'new' already exists in WalkMe (HTTP 409)"
    assert (info.value.status, info.value.body, info.value.guid) == (409, "taken", OTHER_GUID)
    assert tally == Counter({"token": 1, "create": 1, "list": 1})


async def test_create_conflict_on_our_key_held_by_no_listed_segment_has_no_guid(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.append(Reply(409, body="taken"))
    with pytest.raises(walkme.WalkMeConflict) as info:
        await make_client(fake, session).create_segment(SYSTEM, "vip", None, ["a"])
    assert info.value.guid is None  # "vip" is listed, but not under our key


async def test_created_segment_that_cannot_be_found_says_so(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    error = await failure(fake, session, "create", WalkMeError, Reply(201, body="{}"))
    assert str(error) == "created segment 'new' but cannot find its GUID"
    assert (error.status, error.body) == (None, "")


async def test_created_segment_is_found_by_its_key_when_the_answer_has_no_guid(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    """Listed under our key, not our name: found by the key."""
    fake.segments.append({"segmentGuid": OTHER_GUID, "name": "renamed", "externalId": "ext-1"})
    fake.script.append(Reply(201, body="{}"))
    guid = await make_client(fake, session).create_segment(SYSTEM, "new", "ext-1", ["a"])
    assert guid == OTHER_GUID


async def test_create_retried_after_a_lost_answer_finds_the_segment_by_its_key(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.segments.append({"segmentGuid": OTHER_GUID, "name": "renamed", "externalId": "ext-1"})
    fake.script.append(Reply(502))
    tally: Counter[str] = Counter()
    client = make_client(fake, session)
    assert await client.create_segment(SYSTEM, "new", "ext-1", ["a"], tally=tally) == OTHER_GUID
    assert [seen.method for seen in fake.calls] == ["POST", "GET"]  # found: not sent again
    assert tally == Counter({"token": 1, "create": 1, "list": 1})


async def test_find_segment_by_external_id_or_else_by_name(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.segments = [
        {"segmentGuid": GUID, "name": "vip", "externalId": "ext-2"},
        {"segmentGuid": OTHER_GUID, "name": "other", "externalId": "ext-1"},
    ]
    client = make_client(fake, session)
    by_key = await client.find_segment(SYSTEM, "vip", "ext-1")
    assert by_key is not None
    assert by_key.guid == OTHER_GUID
    by_name = await client.find_segment(SYSTEM, "vip", None)
    assert by_name is not None
    assert by_name.guid == GUID
    assert await client.find_segment(SYSTEM, "vip", "ext-3") is None
    assert await client.find_segment(SYSTEM, "nobody", None) is None


# -- what each request carries ---------------------------------------------------------


async def test_the_lease_proof_comes_before_every_send_of_a_change(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    proofs: list[int] = []

    async def prove() -> None:
        proofs.append(len(fake.calls))

    client = await revoked_client(fake, session)
    await client.update_segment(SYSTEM, GUID, "add", ["a"], prove)  # 401, fresh token, 200
    assert proofs == [0, 1]
    await client.create_segment(SYSTEM, "new", "ext-1", ["a"], prove)
    assert proofs == [0, 1, 2]


async def test_requests_carry_json_headers_and_a_compact_body(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = WalkMeClient(
        session,
        api_url=fake.url + "/",  # a trailing slash is not doubled in paths
        token_url=fake.url + TOKEN_PATH,
        client_id=CLIENT_ID,
        client_secret=SecretStr(SECRET),
    )
    await client.update_segment(SYSTEM, GUID, "add", ["a", "b"])
    await client.delete_segment(SYSTEM, GUID.replace("-", "").upper())
    await client.list_segments(SYSTEM)
    update, delete, listing = fake.calls
    assert update.body == b'{"action":"add","userIds":["a","b"]}'
    assert (delete.method, delete.path, delete.body) == ("DELETE", f"{SEGMENTS}/{GUID}", b"")
    assert (listing.method, listing.path) == ("GET", SEGMENTS)
    for headers in fake.headers:
        assert headers["Accept"] == "application/json"
    assert fake.headers[0]["Content-Type"] == "application/json"
    assert "Content-Type" not in fake.headers[1]  # nothing to describe


async def test_token_lifetime_missing_or_unreadable_is_an_hour(
    fake: FakeWalkMe, session: aiohttp.ClientSession, clock: Clock
) -> None:
    fake.token_script.extend(
        [
            Reply(200, body='{"access_token": "t1"}'),
            Reply(200, body='{"access_token": "t2", "expires_in": "soon"}'),
        ]
    )
    client = make_client(fake, session)
    assert await client.access_token() == "t1"
    clock.now += 3600 - 300 - 1  # an hour, less the five minutes' margin
    assert await client.access_token() == "t1"
    clock.now += 1
    assert await client.access_token() == "t2"
    clock.now += 3600 - 300 - 1
    assert await client.access_token() == "t2"
    clock.now += 1
    assert await client.access_token() == "token-1"
    assert client.token_refreshes == 3


async def test_token_refresh_is_logged_and_counted(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.expires_in = 120
    before = sample("syncd_walkme_token_refreshes_total")
    with structlog.testing.capture_logs() as logs:
        await make_client(fake, session).access_token()
    assert sample("syncd_walkme_token_refreshes_total") == before + 1
    assert named(logs, "walkme.token_refreshed") == [
        {"event": "walkme.token_refreshed", "expires_in": 120.0, "log_level": "info"}
    ]


async def test_a_stale_token_is_not_forgotten_for_a_newer_one(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    """A 401 to an old token, answered after another caller refreshed it, keeps the
    new token (no second refresh)."""
    client = make_client(fake, session)
    old = await client.access_token()
    fake.revoke()
    await client.list_segments(SYSTEM)  # 401, refresh: token-2
    client._invalidate(old)
    assert await client.access_token() == "token-2"
    assert len(fake.token_requests) == 2


# -- tally, metrics and log lines --------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_tally_counts_every_request_by_kind(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    tally: Counter[str] = Counter()
    client = make_client(fake, session)
    await client.list_segments(SYSTEM, tally=tally)
    fake.revoke()
    fake.script.append(Reply(503))
    await client.update_segment(SYSTEM, GUID, "add", ["a"], tally=tally)  # 401, 503, 200
    assert tally == Counter({"token": 2, "list": 1, "update": 3})
    fake.segments.append({"segmentGuid": OTHER_GUID, "externalId": create_key(SYSTEM, "new")})
    fake.script.append(Reply(200, body="<html/>", content_type="text/html"))
    await client.create_segment(SYSTEM, "new", None, ["a"], tally=tally)  # html, list: found
    assert tally == Counter({"token": 2, "list": 2, "update": 3, "create": 1})
    await client.find_segment(SYSTEM, "vip", None, tally=tally)
    assert tally["list"] == 3
    fake.script.append(Reply(201, body="{}"))
    await client.create_segment(SYSTEM, "new", None, ["a"], tally=tally)  # no GUID: listed
    assert (tally["create"], tally["list"]) == (2, 4)


async def test_requests_are_counted_and_timed_by_kind_and_status(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    labels = [("update", "200"), ("update", "503"), ("token", "error"), ("token", "200")]
    before = {kl: sample("syncd_walkme_requests_total", kind=kl[0], status=kl[1]) for kl in labels}
    timed = sample("syncd_walkme_request_duration_seconds_count", kind="update")
    took = sample("syncd_walkme_request_duration_seconds_sum", kind="update")
    fake.script.append(Reply(503))
    client = make_client(fake, session)
    await client.update_segment(SYSTEM, GUID, "add", ["a"])  # token, 503, 200
    fake.delay = 0.2
    await client.update_segment(SYSTEM, GUID, "add", ["a"])
    with pytest.raises(WalkMeUnavailable):
        await failing_client(aiohttp.ServerDisconnectedError())[0].access_token()
    after = {kl: sample("syncd_walkme_requests_total", kind=kl[0], status=kl[1]) for kl in labels}
    assert {kl: after[kl] - before[kl] for kl in labels} == {
        ("update", "200"): 2,
        ("update", "503"): 1,
        ("token", "error"): 2,  # no answer came
        ("token", "200"): 1,
    }
    assert sample("syncd_walkme_request_duration_seconds_count", kind="update") - timed == 3
    assert 0.2 <= sample("syncd_walkme_request_duration_seconds_sum", kind="update") - took < 5


@pytest.fixture
def retry_hook() -> Iterator[None]:
    """The retry hook as ``open_runtime`` sets it."""
    hooks = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([walkme.log_retry])
    try:
        yield
    finally:
        stamina.instrumentation.set_on_retry_hooks(hooks)


@pytest.mark.usefixtures("retry_hook")
async def test_each_retry_is_logged_and_counted_by_its_reason(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    reasons = get_args(walkme.RetryReason)
    before = {r: sample("syncd_walkme_retries_total", reason=r) for r in reasons}
    fake.token_script.append(Reply(503))
    fake.script.extend(
        [
            Reply(429, {"Retry-After": "0.015"}),
            Reply(500),
            Reply(200, body="<html/>", content_type="text/html"),
        ]
    )
    fake.cut_short = 0
    client = make_client(fake, session, attempts=5, max_wait=0.02)
    with structlog.testing.capture_logs() as logs:
        await client.update_segment(SYSTEM, GUID, "add", ["a"])
        fake.hang_up = 1  # a POST is not sent again by aiohttp itself
        await client.create_segment(SYSTEM, "new", "ext-1", ["a"])
        fake.cut_short, fake.cut_how = 1, "length"
        await client.update_segment(SYSTEM, GUID, "add", ["a"])
    retries = named(logs, "walkme.retry")
    assert [(e["reason"], e["status"], e["retry"]) for e in retries] == [
        ("token endpoint unavailable", 503, 1),
        ("throttled", 429, 1),
        ("server error", 500, 2),
        ("unexpected answer", 200, 3),
        ("connection error", None, 1),
        ("broken response", None, 1),
    ]
    assert retries[1]["wait_s"] == 0.01  # Retry-After 0.015, rounded to 2 places
    assert retries[1]["error"] == "throttled (HTTP 429)"
    assert retries[4]["error"].startswith("connection to 127.0.0.1:")
    assert all(e["log_level"] == "warning" for e in retries)
    after = {r: sample("syncd_walkme_retries_total", reason=r) for r in reasons}
    assert {r: after[r] - before[r] for r in reasons if after[r] != before[r]} == {
        "token endpoint unavailable": 1,
        "throttled": 1,
        "server error": 1,
        "unexpected answer": 1,
        "connection error": 1,
        "broken response": 1,
    }


def test_the_retry_hook_ignores_what_is_not_retried() -> None:
    details = RetryDetails("x", (), {}, 1, 0.5, 0.5, ValueError("no"))
    with structlog.testing.capture_logs() as logs:
        walkme.log_retry(details)
    assert logs == []


async def test_a_refusal_is_logged_with_its_kind_status_and_body(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.append(Reply(400, body="bad id"))
    with structlog.testing.capture_logs() as logs, pytest.raises(WalkMeRejected):
        await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
    assert named(logs, "walkme.rejected") == [
        {
            "event": "walkme.rejected",
            "kind": "update",
            "status": 400,
            "body": "bad id",
            "log_level": "warning",
        }
    ]


# -- connections that fail -------------------------------------------------------------


class FailingSession:
    """Stands in for the aiohttp session: every request fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.requests = 0

    def request(self, *args: object, **kwargs: object) -> None:
        self.requests += 1
        raise self.error


def failing_client(
    error: Exception, *, fail_fast: bool = False
) -> tuple[WalkMeClient, FailingSession]:
    failing = FailingSession(error)
    client = WalkMeClient(
        cast(aiohttp.ClientSession, failing),
        api_url="https://walkme.example",
        token_url="https://walkme.example:8443/token",
        client_id=CLIENT_ID,
        client_secret=SecretStr(SECRET),
        attempts=2,
        max_wait=0.01,
        fail_fast=fail_fast,
    )
    return client, failing


def tls_error(reason: str | None) -> ssl.SSLError:
    """As the ssl module raises them: with a ``reason`` (sometimes None)."""
    error = ssl.SSLError(1, "[SSL] wrong version number")
    error.reason = reason  # type: ignore[assignment]  # typeshed: str, the ssl module: str | None
    return error


def connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = ConnectionKey("walkme.example", 8443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


@pytest.mark.parametrize(
    ("error", "unconnected", "detail"),
    [
        pytest.param(
            aiohttp.ConnectionTimeoutError(),
            True,
            "cannot connect to walkme.example:8443: connect timed out",
            id="connect-timeout",
        ),
        pytest.param(
            TimeoutError(),
            False,
            "no answer from walkme.example:8443 in time (SYNCD_HTTP_TIMEOUT)",
            id="timeout",
        ),
        pytest.param(
            connector_error(ConnectionRefusedError(111, "Connection refused")),
            True,
            "cannot connect to walkme.example:8443: Connection refused",
            id="refused",
        ),
        pytest.param(
            connector_error(OSError("Name or service not known")),
            True,
            "cannot connect to walkme.example:8443: Name or service not known",
            id="no-errno",
        ),
        pytest.param(
            connector_error(OSError(1, "words of its own")),
            True,
            "cannot connect to walkme.example:8443: Operation not permitted",
            id="errno-1",
        ),
        pytest.param(
            connector_error(OSError(0, "Odd")),
            True,
            "cannot connect to walkme.example:8443: Odd",
            id="errno-0",
        ),
        pytest.param(
            connector_error(OSError()),
            True,
            "cannot connect to walkme.example:8443: OSError",
            id="no-words",
        ),
        pytest.param(
            connector_error(tls_error("WRONG_VERSION_NUMBER")),
            True,
            "cannot connect to walkme.example:8443: TLS: WRONG_VERSION_NUMBER",
            id="tls",
        ),
        pytest.param(
            connector_error(tls_error(None)),
            True,
            "cannot connect to walkme.example:8443: TLS: [SSL] wrong version number",
            id="tls-without-reason",
        ),
        pytest.param(
            aiohttp.ClientConnectorCertificateError(
                ConnectionKey("walkme.example", 8443, True, True, None, None, None),
                ssl.SSLCertVerificationError(1, "self-signed certificate"),
            ),
            True,
            "cannot connect to walkme.example:8443: TLS certificate not trusted:"
            " self-signed certificate",
            id="certificate",
        ),
        pytest.param(
            aiohttp.ServerDisconnectedError(),
            False,
            "connection to walkme.example:8443 closed by the server before it answered",
            id="disconnected",
        ),
        pytest.param(
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            False,
            "connection to walkme.example:8443 failed: [Errno 104] Connection reset by peer",
            id="reset",
        ),
        pytest.param(
            aiohttp.ClientConnectionError(),
            False,
            "connection to walkme.example:8443 failed: ClientConnectionError",
            id="wordless",
        ),
        pytest.param(
            aiohttp.ClientPayloadError("x"),
            False,
            "answer from walkme.example:8443 cut short: ClientPayloadError",
            id="payload",
        ),
    ],
)
@pytest.mark.parametrize("fail_fast", [False, True])
@pytest.mark.usefixtures("retry_hook")
async def test_failed_connections_name_where_and_why(
    error: Exception, unconnected: bool, detail: str, fail_fast: bool
) -> None:
    """Retried like any transient failure, except (fail_fast, ``syncd check``) a
    connection that could not be made at all."""
    client, failing = failing_client(error, fail_fast=fail_fast)
    reason = (
        "timeout"
        if isinstance(error, TimeoutError)
        else "broken response"
        if isinstance(error, aiohttp.ClientPayloadError)
        else "connection error"
    )
    retried = sample("syncd_walkme_retries_total", reason=reason)
    with pytest.raises(WalkMeUnavailable) as info:
        await client.access_token()
    once = fail_fast and unconnected
    assert sample("syncd_walkme_retries_total", reason=reason) - retried == (0 if once else 1)
    times = "once" if once else "2 times"
    assert str(info.value) == f"WalkMe token call failed {times}; last: {detail}"
    assert failing.requests == (1 if once else 2)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("https://api.walkme.com/x?y=1", "api.walkme.com:443"),
        ("http://user:pw@127.0.0.1/x", "127.0.0.1:80"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),
        ("https://[::1]:8443/x", "[::1]:8443"),
        ("https://[::1]/x", "[::1]:443"),
        ("https://host:notaport/x", "host:443"),
        ("nonsense", "?:80"),
    ],
)
def test_endpoint_is_host_and_port_only(url: str, endpoint: str) -> None:
    assert walkme._endpoint(url) == endpoint


# -- shutdown ----------------------------------------------------------------------------


async def test_shutdown_lets_every_request_on_the_wire_finish(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    await client.access_token()
    fake.delay = 0.2
    first = asyncio.ensure_future(client.update_segment(SYSTEM, GUID, "add", ["a"]))
    await asyncio.sleep(0.1)
    fake.delay = 0.4
    second = asyncio.ensure_future(client.update_segment(SYSTEM, GUID, "add", ["b"]))
    await asyncio.sleep(0.05)
    client.stop()
    await asyncio.gather(first, second)  # both answered: neither is WalkMeStopped
    with pytest.raises(walkme.WalkMeStopped) as info:
        await client.update_segment(SYSTEM, GUID, "add", ["c"])
    assert str(info.value) == "not sending update: syncd is stopping"
    assert len(fake.calls) == 2


async def test_shutdown_ends_a_wait_for_a_retry_at_once(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session, max_wait=5.0)
    await client.update_segment(SYSTEM, GUID, "add", ["a"])  # a request came and went
    fake.script.append(Reply(503, {"Retry-After": "5"}))
    waiting = asyncio.ensure_future(client.update_segment(SYSTEM, GUID, "add", ["b"]))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    client.stop()
    with pytest.raises(walkme.WalkMeStopped) as info:
        await waiting
    assert time.monotonic() - started < 1.0
    assert str(info.value) == "stopped while waiting to retry update: syncd is stopping"
    assert len(fake.calls) == 2  # the retry was never sent


async def test_shutdown_during_a_request_that_must_be_retried_ends_after_it(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session, max_wait=5.0)
    await client.access_token()
    fake.delay = 0.3
    fake.script.append(Reply(503, {"Retry-After": "5"}))
    sending = asyncio.ensure_future(client.update_segment(SYSTEM, GUID, "add", ["a"]))
    await asyncio.sleep(0.1)
    client.stop()
    started = time.monotonic()
    with pytest.raises(walkme.WalkMeStopped):
        await sending
    assert time.monotonic() - started < 0.8  # the answer, then no wait for the retry
    assert len(fake.calls) == 1


async def test_a_call_cancelled_while_waiting_to_retry_sends_nothing_more(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session, max_wait=0.3)
    fake.script.append(Reply(503, {"Retry-After": "0.3"}))
    sending = asyncio.ensure_future(client.update_segment(SYSTEM, GUID, "add", ["a"]))
    await asyncio.sleep(0.1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await asyncio.sleep(0.5)
    assert len(fake.calls) == 1


def test_a_token_never_shows_its_value() -> None:
    assert repr(walkme._Token("s3cret-token", 0.0)) == "<token [redacted]>"


# -- the session -------------------------------------------------------------------------


async def test_session_verifies_tls_with_the_given_timeouts() -> None:
    async with walkme.make_session(12.5, None, 3.0) as made:
        assert made.timeout.total == 12.5
        assert made.timeout.sock_connect == 3.0
        connector = made.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == 32
        context = connector._ssl
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert made._raise_for_status is False


async def test_session_trusts_the_given_ca_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        walkme.make_session(10.0, tmp_path / "missing.pem")
    bundle = ssl.get_default_verify_paths().cafile
    if bundle is None:
        pytest.skip("no CA bundle on this machine to load")
    async with walkme.make_session(10.0, Path(bundle)) as made:
        assert isinstance(made.connector, aiohttp.TCPConnector)


# -- answers no framework sends, and the backoff --------------------------------------


async def test_a_json_answer_without_a_content_type_is_an_acknowledgement(
    session: aiohttp.ClientSession,
) -> None:
    """Content-Type is optional: a JSON object without one is read as JSON (a token,
    then an acknowledged update), not refused as another media type."""
    body = b'{"access_token": "token-1", "expires_in": 3600}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(body),
        body,
    )
    server = BareHttpServer(answer)
    async with server as url:
        await make_client(url, session, attempts=2).update_segment(SYSTEM, GUID, "add", ["a"])
    assert server.requests == 2  # the token, then the update: neither retried


async def test_the_first_retry_waits_half_a_second_plus_up_to_a_second_of_jitter(
    fake: FakeWalkMe, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff starts at 0.5 s, with a jitter of up to 1 s (drawn here at its
    largest); the test stops the client instead of waiting it out."""
    client = make_client(fake, session, max_wait=60)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    waits: list[float] = []

    def record(details: RetryDetails) -> None:
        waits.append(details.wait_for)
        client.stop()

    hooks = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([record])
    try:
        fake.script.append(Reply(503))
        with pytest.raises(walkme.WalkMeStopped):
            await client.update_segment(SYSTEM, GUID, "add", ["a"])
    finally:
        stamina.instrumentation.set_on_retry_hooks(hooks)
    assert waits == [1.5]
