"""Tests for the fake WalkMe server, driven over real 127.0.0.1 sockets."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy

from syncd.sandbox import (
    SANDBOX_SYSTEM_GUID,
    TOKEN_PATH,
    Faults,
    ListShape,
    WalkMeSandbox,
    run_sandbox_in_thread,
)
from syncd.sandbox import cli as sandbox_cli

OTHER_SYSTEM = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
UNKNOWN_GUID = "00000000-0000-4000-8000-000000000000"
REPO_ROOT = Path(__file__).resolve().parent.parent


def basic(client_id: str = "sandbox-client", secret: str = "sandbox-secret") -> str:  # noqa: S107
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


class Api:
    """A thin raw client: the tests check the server, so nothing is hidden here."""

    def __init__(self, session: aiohttp.ClientSession, sandbox: WalkMeSandbox) -> None:
        self.session = session
        self.sandbox = sandbox
        self.token = ""

    async def get_token(
        self, authorization: str | None = None, grant: str = "client_credentials"
    ) -> tuple[int, Any]:
        headers = {"Authorization": authorization or basic()}
        async with self.session.post(
            self.sandbox.url + TOKEN_PATH, data={"grant_type": grant}, headers=headers
        ) as resp:
            return resp.status, await resp.json()

    async def login(self) -> str:
        status, body = await self.get_token()
        assert status == 200
        self.token = body["access_token"]
        return self.token

    def url(self, segment: str | None = None, system: str = SANDBOX_SYSTEM_GUID) -> str:
        base = f"{self.sandbox.url}/public/v1/user/system/{system}/segment"
        return base if segment is None else f"{base}/{segment}"

    async def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        token: str | None = None,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        # A file-like body: aiohttp warns that multi-MB raw bytes may block the loop.
        data = None if body is None else io.BytesIO(json.dumps(body).encode())
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return resp.status, parsed, resp.headers

    async def create(self, name: str, ids: list[str], external_id: str | None = None) -> str:
        body: dict[str, Any] = {"name": name, "userIds": ids}
        if external_id is not None:
            body["id"] = external_id
        status, answer, _ = await self.call("POST", self.url(), body)
        assert status == 201, answer
        guid: str = answer["segmentGuid"]
        return guid

    async def update(self, guid: str, action: str, ids: list[Any]) -> tuple[int, Any]:
        status, answer, _ = await self.call(
            "PUT", self.url(guid), {"action": action, "userIds": ids}
        )
        return status, answer


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[WalkMeSandbox]:
    async with WalkMeSandbox(systems=(SANDBOX_SYSTEM_GUID, OTHER_SYSTEM)) as sb:
        yield sb


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest_asyncio.fixture
async def api(session: aiohttp.ClientSession, sandbox: WalkMeSandbox) -> Api:
    client = Api(session, sandbox)
    await client.login()
    return client


# ---------------------------------------------------------------------- token


@pytest.mark.asyncio
async def test_token_issued_for_good_credentials(
    session: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    status, body = await Api(session, sandbox).get_token()
    assert status == 200
    assert len(body["access_token"]) >= 40
    assert body["expires_in"] == 86400
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "segments:write segments:read"
    assert sandbox.tokens_issued == 1
    assert sandbox.count("token", status=200) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "authorization",
    [basic(secret="wrong"), basic(client_id="other"), "Basic !!!notbase64", "Bearer abc", "x"],
)
async def test_token_rejects_bad_credentials(
    session: aiohttp.ClientSession, sandbox: WalkMeSandbox, authorization: str
) -> None:
    status, body = await Api(session, sandbox).get_token(authorization)
    assert (status, body) == (401, {"error": "invalid_client"})
    assert sandbox.tokens_issued == 0


@pytest.mark.asyncio
async def test_token_rejects_missing_authorization(
    session: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    async with session.post(
        sandbox.url + TOKEN_PATH, data={"grant_type": "client_credentials"}
    ) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "invalid_client"}


@pytest.mark.asyncio
async def test_token_rejects_wrong_grant(
    session: aiohttp.ClientSession, sandbox: WalkMeSandbox
) -> None:
    status, body = await Api(session, sandbox).get_token(grant="password")
    assert (status, body) == (400, {"error": "unsupported_grant_type"})


# ---------------------------------------------------------------------- bearer


@pytest.mark.asyncio
async def test_segment_calls_need_a_valid_bearer(api: Api) -> None:
    for token in ("", "not-a-token"):
        status, body, headers = await api.call("GET", api.url(), token=token)
        assert (status, body) == (401, {"error": "invalid_token"})
        assert "invalid_token" in headers["WWW-Authenticate"]
    async with api.session.get(api.url()) as resp:
        assert resp.status == 401
    status, _, _ = await api.call("GET", api.url())
    assert status == 200
    assert api.sandbox.count("list", status=401) == 3


@pytest.mark.asyncio
async def test_token_expires(session: aiohttp.ClientSession) -> None:
    async with WalkMeSandbox(token_lifetime=0.3) as sb:
        api = Api(session, sb)
        await api.login()
        assert (await api.call("GET", api.url()))[0] == 200
        await asyncio.sleep(0.35)
        assert (await api.call("GET", api.url()))[0] == 401
        await api.login()
        assert (await api.call("GET", api.url()))[0] == 200


@pytest.mark.asyncio
async def test_revoke_invalidates_current_tokens(api: Api) -> None:
    old = api.token
    api.sandbox.revoke_tokens()
    assert (await api.call("GET", api.url()))[0] == 401
    await api.login()
    assert api.token != old
    assert (await api.call("GET", api.url()))[0] == 200
    assert api.sandbox.tokens_issued == 2


@pytest.mark.asyncio
async def test_forbidden_client_gets_403(session: aiohttp.ClientSession) -> None:
    async with WalkMeSandbox(forbidden_clients={"sandbox-client"}) as sb:
        api = Api(session, sb)
        await api.login()
        status, body, _ = await api.call("GET", api.url())
        assert status == 403
        assert body["error"] == "forbidden"


# ---------------------------------------------------------------------- segments


@pytest.mark.asyncio
async def test_create_update_list_delete(api: Api) -> None:
    sb = api.sandbox
    status, created, _ = await api.call(
        "POST", api.url(), {"id": "heap-1", "name": "Trial users", "userIds": ["a", "b", "a"]}
    )
    assert status == 201
    guid = created["segmentGuid"]
    assert created == {"segmentGuid": guid, "externalId": "heap-1", "name": "Trial users"}
    assert guid == guid.lower()
    assert len(guid.split("-")) == 5
    assert sb.members(guid) == {"a", "b"}

    assert await api.update(guid, "add", ["c", "d"]) == (200, {"success": True})
    assert sb.members(guid) == {"a", "b", "c", "d"}
    assert (await api.update(guid.upper(), "remove", ["a", "zz"]))[0] == 200
    assert sb.members(guid) == {"b", "c", "d"}
    assert (await api.update(guid, "override", ["x"]))[0] == 200
    assert sb.members(guid) == {"x"}
    assert sb.size(guid) == 1

    status, listed, _ = await api.call("GET", api.url())
    assert status == 200
    assert listed == {"data": [created]}
    assert (await api.call("GET", api.url(system=OTHER_SYSTEM)))[1] == {"data": []}

    record = sb.find(external_id="heap-1")
    assert record is not None
    assert record.guid == guid
    assert record.system_guid == SANDBOX_SYSTEM_GUID
    assert sb.find(name="Trial users") is record
    assert sb.find(name="nope") is None

    status, _, _ = await api.call("DELETE", api.url(guid))
    assert status == 200
    assert guid not in sb.segments
    assert (await api.call("DELETE", api.url(guid)))[0] == 404

    assert sb.count("create") == 1
    assert sb.count("update") == 3
    assert sb.count("update", action="add") == 1
    assert sb.count("update", action="override", applied=True) == 1
    assert sb.count("delete", status=404) == 1
    last_update = [r for r in sb.requests if r.kind == "update"][-1]
    assert (last_update.method, last_update.n_ids, last_update.applied) == ("PUT", 1, True)


@pytest.mark.asyncio
async def test_create_without_external_id(api: Api) -> None:
    status, created, _ = await api.call("POST", api.url(), {"name": "n", "userIds": []})
    assert status == 201
    assert created["externalId"] is None
    assert api.sandbox.members(created["segmentGuid"]) == set()


@pytest.mark.asyncio
async def test_duplicate_external_id_conflicts_within_a_system(api: Api) -> None:
    await api.create("one", ["a"], external_id="ext")
    status, body, _ = await api.call("POST", api.url(), {"id": "ext", "name": "two", "userIds": []})
    assert status == 409
    assert body["error"] == "conflict"
    assert len(api.sandbox.segments) == 1
    status, _, _ = await api.call(
        "POST", api.url(system=OTHER_SYSTEM), {"id": "ext", "name": "two", "userIds": []}
    )
    assert status == 201


@pytest.mark.asyncio
async def test_not_found_and_malformed_guids(api: Api) -> None:
    guid = await api.create("s", ["a"])
    assert (await api.update(UNKNOWN_GUID, "add", ["a"]))[0] == 404
    assert (await api.call("GET", api.url(system=UNKNOWN_GUID)))[0] == 404
    # A segment is only found through its own system.
    status, _, _ = await api.call(
        "PUT", api.url(guid, system=OTHER_SYSTEM), {"action": "add", "userIds": ["b"]}
    )
    assert status == 404
    assert (await api.update("not-a-guid", "add", ["a"]))[0] == 400
    assert (await api.call("DELETE", api.url(guid.replace("-", ""))))[0] == 400
    assert api.sandbox.members(guid) == {"a"}


# ---------------------------------------------------------------------- validation


@pytest.mark.asyncio
async def test_limits_accept_25000_ids_of_100_chars(api: Api) -> None:
    ids = [f"{i:0100d}" for i in range(25_000)]  # ~2.6 MB body
    guid = await api.create("big", ids)
    assert api.sandbox.size(guid) == 25_000


@pytest.mark.asyncio
async def test_too_many_ids_rejected(api: Api) -> None:
    guid = await api.create("s", [])
    status, body = await api.update(guid, "add", [str(i) for i in range(25_001)])
    assert status == 400
    assert body["error"] == "validation_error"
    assert body["invalidUserIds"] == []
    assert api.sandbox.size(guid) == 0
    assert api.sandbox.count("update", status=400, applied=False) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["x" * 101, "", 7, None, ["nested"]])
async def test_bad_ids_rejected_and_named(api: Api, bad: Any) -> None:
    guid = await api.create("s", [])
    status, body = await api.update(guid, "add", ["ok", bad, "x" * 100])
    assert status == 400
    assert body["error"] == "validation_error"
    assert body["message"]
    assert body["invalidUserIds"] == [bad]
    assert api.sandbox.size(guid) == 0


@pytest.mark.asyncio
async def test_invalid_user_ids_lists_first_ten(api: Api) -> None:
    guid = await api.create("s", [])
    status, body = await api.update(guid, "add", [f"{i:0101d}" for i in range(15)])
    assert status == 400
    assert body["invalidUserIds"] == [f"{i:0101d}" for i in range(10)]


@pytest.mark.asyncio
async def test_rejected_ids_fail_the_whole_request(api: Api) -> None:
    api.sandbox.rejected_ids = {"poison@x.com"}
    guid = await api.create("s", ["a"])
    status, body = await api.update(guid, "add", ["b", "poison@x.com", "c"])
    assert status == 400
    assert body["invalidUserIds"] == ["poison@x.com"]
    assert api.sandbox.members(guid) == {"a"}
    status, _, _ = await api.call("POST", api.url(), {"name": "t", "userIds": ["poison@x.com"]})
    assert status == 400
    assert (await api.update(guid, "add", ["b", "c"]))[0] == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        {"action": "replace", "userIds": ["a"]},
        {"action": None, "userIds": ["a"]},
        {"userIds": ["a"]},
        {"action": "add"},
        {"action": "add", "userIds": "a"},
        ["a"],
        "add",
    ],
)
async def test_update_body_validation(api: Api, body: Any) -> None:
    guid = await api.create("s", [])
    status, answer, _ = await api.call("PUT", api.url(guid), body)
    assert status == 400
    assert answer["error"] == "validation_error"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "userIds": []},
        {"userIds": []},
        {"name": "n"},
        {"name": "n", "id": 5, "userIds": []},
    ],
)
async def test_create_body_validation(api: Api, body: Any) -> None:
    status, answer, _ = await api.call("POST", api.url(), body)
    assert status == 400
    assert answer["error"] == "validation_error"
    assert not api.sandbox.segments


@pytest.mark.asyncio
async def test_invalid_json_rejected(api: Api) -> None:
    headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
    async with api.session.post(api.url(), data=b"{not json", headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "validation_error"


# ---------------------------------------------------------------------- shapes


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("shape", "key"), [("bare", None), ("data", "data"), ("segments", "segments")]
)
async def test_list_shapes(
    session: aiohttp.ClientSession, shape: ListShape, key: str | None
) -> None:
    async with WalkMeSandbox(list_shape=shape) as sb:
        api = Api(session, sb)
        await api.login()
        await api.create("s", ["a"], external_id="e")
        _, body, _ = await api.call("GET", api.url())
        items = body if key is None else body[key]
        assert [(i["name"], i["externalId"]) for i in items] == [("s", "e")]


@pytest.mark.asyncio
async def test_create_without_guid_in_answer(session: aiohttp.ClientSession) -> None:
    async with WalkMeSandbox(create_returns_guid=False) as sb:
        api = Api(session, sb)
        await api.login()
        status, body, _ = await api.call("POST", api.url(), {"name": "s", "userIds": ["a"]})
        assert (status, body) == (201, {"success": True})
        _, listed, _ = await api.call("GET", api.url())
        guid = listed["data"][0]["segmentGuid"]
        assert sb.members(guid) == {"a"}


# ---------------------------------------------------------------------- faults


@pytest.mark.asyncio
async def test_scripted_429_is_not_applied(api: Api) -> None:
    guid = await api.create("s", [])
    api.sandbox.script(429, times=2, retry_after="3")
    for _ in range(2):
        status, body, headers = await api.call(
            "PUT", api.url(guid), {"action": "add", "userIds": ["a"]}
        )
        assert status == 429
        assert headers["Retry-After"] == "3"
        assert body == {"error": "scripted_429"}
    assert api.sandbox.size(guid) == 0
    assert (await api.update(guid, "add", ["a"]))[0] == 200
    assert api.sandbox.count("update", status=429, applied=False) == 2
    assert api.sandbox.count("update", action="add", applied=True) == 1


@pytest.mark.asyncio
async def test_scripted_body_and_token_script(api: Api) -> None:
    api.sandbox.script(503, body={"message": "maintenance"})
    status, body, _ = await api.call("GET", api.url())
    assert (status, body) == (503, {"message": "maintenance"})
    api.sandbox.script(500, on_token=True)
    status, _ = await api.get_token()
    assert status == 500
    assert (await api.get_token())[0] == 200


@pytest.mark.asyncio
async def test_random_throttle_delta_seconds_and_http_date(api: Api) -> None:
    api.sandbox.faults = Faults(throttle_rate=1.0, retry_after=2)
    status, _, headers = await api.call("GET", api.url())
    assert (status, headers["Retry-After"]) == (429, "2")

    api.sandbox.faults = Faults(throttle_rate=1.0, retry_after=1.5, retry_after_http_date=True)
    before = time.time()
    status, _, headers = await api.call("GET", api.url())
    assert status == 429
    when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert before + 1.5 - 1 <= when <= time.time() + 2.5

    # Token calls are spared unless faults_on_token is set.
    assert (await api.get_token())[0] == 200
    api.sandbox.faults.faults_on_token = True
    assert (await api.get_token())[0] == 429


@pytest.mark.asyncio
async def test_random_errors_are_not_applied_and_seeded(api: Api) -> None:
    guid = await api.create("s", [])

    async def statuses(seed: int) -> list[int]:
        api.sandbox.faults = Faults(seed=seed, error_rate=0.5, throttle_rate=0.3)
        return [(await api.update(guid, "add", ["a"]))[0] for _ in range(20)]

    first = await statuses(7)
    assert first == await statuses(7)
    assert set(first) <= {200, 429, 500, 502, 503}
    assert {429, 200} <= set(first)
    assert set(first) & {500, 502, 503}
    applied = api.sandbox.count("update", applied=True)
    assert applied == 2 * first.count(200)


@pytest.mark.asyncio
async def test_502_is_an_html_gateway_page(api: Api) -> None:
    api.sandbox.script(502)
    status, body, headers = await api.call("GET", api.url())
    assert status == 502
    assert headers["Content-Type"].startswith("text/html")
    assert "Bad Gateway" in body


@pytest.mark.asyncio
async def test_drop_applies_then_disconnects(sandbox: WalkMeSandbox) -> None:
    # aiohttp >= 3.10 resends an idempotent request (PUT, DELETE) once when the server
    # hangs up, so a dropped update may arrive twice; a create (POST) is sent once.
    async with aiohttp.ClientSession() as session:
        api = Api(session, sandbox)
        await api.login()
        guid = await api.create("s", ["a"])
        sandbox.faults = Faults(drop_rate=1.0)
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.update(guid, "add", ["b"])
        assert sandbox.members(guid) == {"a", "b"}
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.call("POST", api.url(), {"name": "t", "userIds": []})
        assert sandbox.find(name="t") is not None
        # Failed requests have nothing to apply and are answered normally.
        assert (await api.update(UNKNOWN_GUID, "add", ["b"]))[0] == 404
        assert sandbox.count("update", status=0, applied=True) >= 1
        assert sandbox.count("create", status=0, applied=True) == 1
        assert all(r.status == 0 and r.applied for r in sandbox.requests if r.dropped)

        sandbox.faults = Faults()
        sandbox.script_drop(times=2)  # two: the resend must be dropped too
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.update(guid, "remove", ["a"])
        assert sandbox.members(guid) == {"b"}
        sandbox.clear_script()
        assert (await api.update(guid, "add", ["c"]))[0] == 200


@pytest.mark.asyncio
async def test_delay(api: Api) -> None:
    api.sandbox.faults = Faults(delay=0.2)
    started = time.monotonic()
    assert (await api.call("GET", api.url()))[0] == 200
    assert time.monotonic() - started >= 0.2


def test_faults_validation() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=1.5)
    with pytest.raises(ValueError, match="unknown"):
        Faults.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="drop_rate"):
        Faults.from_dict({"drop_rate": "high"})
    faults = Faults.from_dict({"seed": 3, "retry_after_http_date": None, "delay": 0})
    assert Faults.from_dict(faults.to_dict()) == faults


# ---------------------------------------------------------------------- control plane


@pytest.mark.asyncio
async def test_control_endpoints(api: Api) -> None:
    sb, session = api.sandbox, api.session
    guid = await api.create("s", ["b", "a"], external_id="e")
    async with session.get(sb.url + "/_sandbox/state") as resp:
        state = await resp.json()
    assert state["segments"] == [
        {"guid": guid, "name": "s", "externalId": "e", "systemGuid": SANDBOX_SYSTEM_GUID, "size": 2}
    ]
    assert state["requests"]["byKind"] == {"token": 1, "create": 1}
    assert state["requests"]["byStatus"] == {"200": 1, "201": 1}
    assert state["tokensIssued"] == 1
    async with session.get(sb.url + "/_sandbox/state?members=1&requests=1") as resp:
        state = await resp.json()
    assert state["segments"][0]["members"] == ["a", "b"]
    assert [r["kind"] for r in state["requestLog"]] == ["token", "create"]

    async with session.post(sb.url + "/_sandbox/faults", json={"throttle_rate": 1.0}) as resp:
        assert resp.status == 200
    assert sb.faults.throttle_rate == 1.0
    assert (await api.call("GET", api.url()))[0] == 429
    async with session.post(sb.url + "/_sandbox/faults", json={"bogus": 1}) as resp:
        assert resp.status == 400
    async with session.post(sb.url + "/_sandbox/faults", json={}) as resp:
        assert resp.status == 200
    assert sb.faults == Faults()

    async with session.post(sb.url + "/_sandbox/script", json={"status": 503}) as resp:
        assert resp.status == 200
    assert (await api.call("GET", api.url()))[0] == 503

    async with session.post(sb.url + "/_sandbox/revoke") as resp:
        assert resp.status == 200
    assert (await api.call("GET", api.url()))[0] == 401
    async with session.get(sb.url + "/_sandbox/state") as resp:
        counts = (await resp.json())["requests"]
    assert counts["byKindStatus"]["list"] == {"429": 1, "503": 1, "401": 1}
    assert counts["byAction"] == {}


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    # Only ever the sandbox's own http://127.0.0.1 URL.
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_thread_runner_serves_sync_code() -> None:
    with run_sandbox_in_thread(token_lifetime=60) as sb:
        status, token = _http(
            "POST",
            sb.url + TOKEN_PATH,
            b"grant_type=client_credentials",
            {"Authorization": basic(), "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 200
        assert token["expires_in"] == 60
        segment_url = f"{sb.url}/public/v1/user/system/{SANDBOX_SYSTEM_GUID}/segment"
        auth = {
            "Authorization": f"Bearer {token['access_token']}",
            "Content-Type": "application/json",
        }
        status, created = _http(
            "POST", segment_url, json.dumps({"name": "s", "userIds": ["a", "b"]}).encode(), auth
        )
        assert status == 201
        assert sb.members(created["segmentGuid"]) == {"a", "b"}
        assert sb.count("create", status=201) == 1
        sb.revoke_tokens()
        assert _http("GET", segment_url, headers=auth)[0] == 401
        status, state = _http("GET", sb.url + "/_sandbox/state")
        assert state["segments"][0]["size"] == 2
        url = sb.url
    with pytest.raises(urllib.error.URLError):
        _http("GET", url + "/_sandbox/state")


FAULT_OPTIONS = ["--seed", "7", "--error-rate", "0.25", "--throttle-rate", "0.5"]
FAULT_OPTIONS += ["--retry-after", "2", "--drop-rate", "0.125", "--delay", "0.01"]
FAULT_OPTIONS += ["--faults-on-token"]


def test_command_line_runs_until_sigterm() -> None:
    """``python -m syncd.sandbox`` serves with the faults its options give until SIGTERM."""
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    command = [sys.executable, "-m", "syncd.sandbox", "--port", "0", "--token-lifetime", "5"]
    command += FAULT_OPTIONS
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("sandbox listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            assert _http("GET", url + "/_sandbox/faults")[1] == {
                "seed": 7,
                "error_rate": 0.25,
                "throttle_rate": 0.5,
                "retry_after": 2.0,
                "retry_after_http_date": False,
                "drop_rate": 0.125,
                "delay": 0.01,
                "faults_on_token": True,
            }
            _http("POST", url + "/_sandbox/faults", b"{}")  # no faults for the token below
            status, token = _http(
                "POST",
                url + TOKEN_PATH,
                b"grant_type=client_credentials",
                {"Authorization": basic(), "Content-Type": "application/x-www-form-urlencoded"},
            )
            assert (status, token["expires_in"]) == (200, 5)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
            assert proc.returncode == 0
            assert stderr == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_command_line_refuses_a_fault_rate_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    """A rate outside [0, 1] is one line naming it, exit 2, and nothing served."""
    assert sandbox_cli.main(["--port", "0", "--drop-rate", "1.5"]) == 2
    assert capsys.readouterr().err == "sandbox: Faults.drop_rate must be within [0, 1], got 1.5\n"
