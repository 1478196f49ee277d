"""``WalkMeClient`` against a tiny scripted WalkMe on 127.0.0.1: tokens, 401/403, retries."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from syncd import walkme
from syncd.walkme import (
    WalkMeAuthError,
    WalkMeClient,
    WalkMeError,
    WalkMeNotFound,
    WalkMeUnavailable,
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
        return app

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
        if self.token_script:
            return self.answer(self.token_script.popleft())
        self.issued += 1
        value = f"token-{self.issued}"
        self.valid.add(value)
        return web.json_response(
            {"access_token": value, "expires_in": self.expires_in, "token_type": self.token_type}
        )

    async def segment(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        body = await request.read()
        loop_time = asyncio.get_running_loop().time()
        self.calls.append(Seen(request.method, request.path, authorization, loop_time, body))
        if self.script:
            return self.answer(self.script.popleft())
        if authorization.removeprefix("Bearer ") not in self.valid:
            return web.json_response({"error": "invalid_token"}, status=401)
        if request.method == "GET":
            return web.json_response({"data": self.segments})
        if request.method == "POST":
            return web.json_response({"segmentGuid": GUID, "name": "new"}, status=201)
        return web.json_response({"success": True})


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


def test_client_repr_hides_the_secret() -> None:
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

    assert SECRET not in asyncio.run(build())


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
