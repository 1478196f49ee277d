"""``WalkMeClient`` against a tiny scripted WalkMe on 127.0.0.1: tokens, 401/403, retries."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from syncd import walkme
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

SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
CLIENT_ID = "client-1"
SECRET = "TOPSECRET-9f8e7d6c5b4a"
TOKEN_PATH = "/accounts/connect/token"
SEGMENTS = f"/public/v1/user/system/{SYSTEM}/segment"


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
        self.segments: list[dict[str, Any]] = [{"segmentGuid": GUID, "name": "vip"}]
        self.server: TestServer | None = None
        self.elsewhere: list[Seen] = []  # requests that followed a redirect
        self.cut_short = 0  # answer this many segment calls with a body cut short
        self.cut_how: CutShort = "length"
        self.echo: int | None = None  # answer segment calls with this status, echoing them
        self.token_echo: int | None = None  # the same for the token call

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
    await server.start_server()
    walkme_fake.server = server
    try:
        yield walkme_fake
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client_session:
        yield client_session


def make_client(
    fake: FakeWalkMe,
    session: aiohttp.ClientSession,
    *,
    attempts: int = 4,
    max_wait: float = 0.02,
) -> WalkMeClient:
    return WalkMeClient(
        session,
        api_url=fake.url,
        token_url=fake.url + TOKEN_PATH,
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
    fake.token_script.append(Reply(200, body='{"expires_in": 3600}'))
    with pytest.raises(WalkMeError, match="access_token"):
        await make_client(fake, session).access_token()


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
    client = make_client(fake, session)
    await client.access_token()
    fake.revoke()
    await client.update_segment(SYSTEM, GUID.replace("-", ""), "remove", ["a", "b"])
    first, second = fake.calls
    assert first.body == second.body
    assert json.loads(second.body) == {"action": "remove", "userIds": ["a", "b"]}
    assert second.method == "PUT"
    assert second.path == f"{SEGMENTS}/{GUID}"


async def test_401_twice_is_an_auth_error(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    fake.script.extend([Reply(401), Reply(401), Reply(200, body="[]")])
    with pytest.raises(WalkMeAuthError) as info:
        await make_client(fake, session).list_segments(SYSTEM)
    assert info.value.status == 401
    assert len(fake.calls) == 2  # one retry with a fresh token, no more
    assert len(fake.token_requests) == 2
    assert SECRET not in str(info.value)


async def test_many_concurrent_401s_share_one_refresh(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    client = make_client(fake, session)
    await client.access_token()
    fake.revoke()
    fake.token_delay = 0.05
    await asyncio.gather(*(client.list_segments(SYSTEM) for _ in range(20)))
    assert len(fake.token_requests) == 2


async def test_403_is_an_auth_error_naming_segments_api(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.append(Reply(403, body='{"error": "forbidden"}'))
    with pytest.raises(WalkMeAuthError) as info:
        await make_client(fake, session).list_segments(SYSTEM)
    assert "Segments API" in str(info.value)
    assert info.value.status == 403
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
    fake.script.extend([Reply(503)] * 10)
    with pytest.raises(WalkMeUnavailable) as info:
        await make_client(fake, session, attempts=3).list_segments(SYSTEM)
    assert info.value.status == 503
    assert len(fake.calls) == 3


async def test_throttled_until_attempts_exhausted(
    fake: FakeWalkMe, session: aiohttp.ClientSession
) -> None:
    fake.script.extend([Reply(429, {"Retry-After": "0.01"})] * 10)
    with pytest.raises(WalkMeUnavailable):
        await make_client(fake, session, attempts=4).update_segment(SYSTEM, GUID, "add", ["a"])
    assert len(fake.calls) == 4


@pytest.mark.parametrize("status", [400, 409, 413, 422])
async def test_client_errors_not_retried(
    fake: FakeWalkMe, session: aiohttp.ClientSession, status: int
) -> None:
    fake.script.append(Reply(status, body='{"message": "userIds: bad"}'))
    with pytest.raises(WalkMeError) as info:
        await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
    assert not isinstance(info.value, WalkMeUnavailable | WalkMeAuthError)
    assert info.value.status == status
    assert len(fake.calls) == 1


async def test_404_not_retried(fake: FakeWalkMe, session: aiohttp.ClientSession) -> None:
    fake.script.append(Reply(404))
    with pytest.raises(WalkMeNotFound):
        await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
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
    client = WalkMeClient(
        session,
        api_url=url,
        token_url=url + TOKEN_PATH,
        client_id=CLIENT_ID,
        client_secret=SecretStr(SECRET),
        attempts=2,
        max_wait=0.01,
    )
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
    fake.script.extend([reply] * 3)
    with pytest.raises(WalkMeUnavailable) as info:
        await make_client(fake, session, attempts=3).update_segment(SYSTEM, GUID, "add", ["a"])
    assert len(fake.calls) == 3
    assert reply.body[:20] in str(info.value)  # the body's first bytes, for the operator
    assert "not an acknowledgement" in str(info.value)


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
    fake.script.extend([reply] * 2)
    with pytest.raises(WalkMeUnavailable):
        await make_client(fake, session, attempts=2).list_segments(SYSTEM)


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
    fake.token_script.append(Reply(200, body='{"access_token": ""}'))
    with pytest.raises(WalkMeError, match="access_token"):
        await make_client(fake, session).access_token()
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
    fake.script.append(Reply(413, body='{"error": "payload too large"}'))
    with pytest.raises(WalkMeTooLarge):
        await make_client(fake, session).update_segment(SYSTEM, GUID, "add", ["a"])
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
