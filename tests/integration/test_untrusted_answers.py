"""What syncd trusts: only WalkMe's own acknowledgement lands in the snapshot, a 413
is split, a pending batch is replayed in today's batch size, and no secret echoed
back by a server reaches any output or the state database.

A ``Gateway`` stands in front of the sandbox as a proxy, a captive portal or an
echoing server would: it forwards each call unless a scripted answer takes it.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from syncd.sandbox import TOKEN_PATH, WalkMeSandbox
from syncd.state import StateStore, open_store
from tests.support.harness import (
    CLIENT_ID,
    SEGMENTS_PATH,
    Harness,
    HarnessFactory,
    cli_env,
    raw_call,
    seed_segment,
    segment_requests,
    segments_named,
)
from tests.support.ids import make_ids
from tests.support.processes import run_cli_async

Answer = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


class Gateway:
    """Forwards every call to the sandbox, except those a scripted answer takes."""

    def __init__(self, sandbox: WalkMeSandbox) -> None:
        self.sandbox = sandbox
        # By kind ("token", "create", "update", "list", "delete"); None forwards.
        self.script: defaultdict[str, deque[Answer | None]] = defaultdict(deque)
        self.tokens: list[str] = []  # every access token the sandbox issued through here
        self.server: TestServer | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._session = aiohttp.ClientSession()
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def kind(request: web.Request) -> str:
        if request.path == TOKEN_PATH:
            return "token"
        methods = {"POST": "create", "PUT": "update", "GET": "list", "DELETE": "delete"}
        return methods[request.method]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        queue = self.script[self.kind(request)]
        answer = queue.popleft() if queue else None
        if answer is not None:
            return await answer(request, body)
        return await self.forward(request, body)

    async def forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {
            key: request.headers[key]
            for key in ("Authorization", "Content-Type", "Accept")
            if key in request.headers
        }
        async with self._session.request(
            request.method,
            self.sandbox.url + request.path_qs,
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as response:
            data = await response.read()
            content_type = response.headers.get("Content-Type", "application/json")
            if self.kind(request) == "token" and response.status == 200:
                self.tokens.append(json.loads(data)["access_token"])
            return web.Response(
                status=response.status, body=data, headers={"Content-Type": content_type}
            )


def redirect_to(location: str, status: int) -> Answer:
    async def answer(request: web.Request, body: bytes) -> web.Response:
        return web.Response(status=status, headers={"Location": location + request.path_qs})

    return answer


def html(status: int = 200) -> Answer:
    async def answer(request: web.Request, body: bytes) -> web.Response:
        page = "<html><head><title>Sign in</title></head><body>Wi-Fi login</body></html>"
        return web.Response(status=status, text=page, content_type="text/html")

    return answer


def echo(status: int) -> Answer:
    """A careless server: the request's headers and body, and the client credentials
    it decoded (also URL-encoded, as a form would carry them), in its error."""

    async def answer(request: web.Request, body: bytes) -> web.Response:
        basic = request.headers.get("Authorization", "").removeprefix("Basic ")
        decoded = base64.b64decode(basic).decode() if request.path == TOKEN_PATH else ""
        client_id, _, secret = decoded.partition(":")
        echoed = {
            "error": "echo",
            "secret": secret,
            "client": f"client_id={quote(client_id)}&client_secret={quote_plus(secret)}",
            "authorization": request.headers.get("Authorization", ""),
            "headers": dict(request.headers),
            "body": body.decode(errors="replace")[:200],
        }
        return web.json_response(echoed, status=status)

    return answer


@pytest_asyncio.fixture
async def gateway(harness: Harness) -> AsyncIterator[Gateway]:
    front = Gateway(harness.sandbox)
    await front.start()
    try:
        yield front
    finally:
        await front.close()


async def opened(harness: Harness) -> StateStore:
    return await open_store(harness.state_url)


async def snapshot_of(harness: Harness, name: str) -> set[str]:
    store = await opened(harness)
    try:
        return {member async for chunk in store.snapshot(name, 10_000) for member in chunk.ids()}
    finally:
        await store.close()


# ------------------------------------------------------------ acknowledgements


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_update_answered_with_a_redirect_sends_nothing_there_and_records_nothing(
    harness: Harness, gateway: Gateway, status: int
) -> None:
    """The redirect points at a server that would apply the batch (the sandbox
    itself): syncd must not follow it, nor record anything."""
    source = make_ids(10)
    settings = harness.settings(
        [harness.mapping("Moved", source)], walkme_api_url=gateway.url, retry_attempts=2
    )
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Moved")
    harness.source("Moved", [*source, "new@example.com"])
    gateway.script["update"].append(redirect_to(harness.sandbox.url, status))
    harness.sandbox.clear_requests()

    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert f"{harness.sandbox.url}/public/v1/" in outcome.error  # names the Location
    assert "SYNCD_WALKME_API_URL" in outcome.error
    assert segment_requests(harness.sandbox) == []  # nothing went where it pointed
    assert harness.sandbox.members(guid) == set(source)
    assert await snapshot_of(harness, "Moved") == set(source)

    # Once the gateway behaves, the change goes through.
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert harness.sandbox.members(guid) == {*source, "new@example.com"}


async def test_update_answered_200_html_is_not_recorded(harness: Harness, gateway: Gateway) -> None:
    source = make_ids(10)
    settings = harness.settings(
        [harness.mapping("Portal", source)], walkme_api_url=gateway.url, retry_attempts=3
    )
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Portal")
    changed = [*source[2:], "new@example.com"]
    harness.source("Portal", changed)
    gateway.script["update"].extend(html() for _ in range(3))

    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "<html><head><title>Sign in" in outcome.error  # the body's first bytes
    # The snapshot still equals what WalkMe holds: the HTML 200 counted for nothing.
    assert harness.sandbox.members(guid) == set(source)
    assert await snapshot_of(harness, "Portal") == set(source)

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert harness.sandbox.members(guid) == set(changed)
    assert await snapshot_of(harness, "Portal") == set(changed)


async def test_update_answered_html_once_is_sent_again(harness: Harness, gateway: Gateway) -> None:
    source = make_ids(10)
    settings = harness.settings([harness.mapping("Once", source)], walkme_api_url=gateway.url)
    assert (await harness.sync_one(settings)).result == "synced"
    harness.source("Once", [*source, "new@example.com"])
    gateway.script["update"].append(html())
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert harness.sandbox.members(harness.guid("Once")) == {*source, "new@example.com"}


async def test_list_answered_html_adopts_and_creates_nothing(
    harness: Harness, gateway: Gateway
) -> None:
    """A bogus list read as "no such segment" would make a second segment by that name."""
    guid = await seed_segment(harness.sandbox, "Listed", ["a@example.com"])
    settings = harness.settings(
        [harness.mapping("Listed", ["a@example.com", "b@example.com"])],
        walkme_api_url=gateway.url,
        retry_attempts=2,
    )
    gateway.script["list"].extend(html() for _ in range(2))
    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert len(segments_named(harness.sandbox, "Listed")) == 1

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert [s["guid"] for s in segments_named(harness.sandbox, "Listed")] == [guid]
    assert harness.sandbox.members(guid) == {"a@example.com", "b@example.com"}


# ------------------------------------------------------------ 413


ID_BYTES = len(json.dumps(make_ids(1))) - 1  # one id in the JSON body, with its comma


async def test_batch_answered_413_is_halved_and_the_run_keeps_to_the_size_that_passed(
    make_harness: HarnessFactory,
) -> None:
    # A proxy that takes about 600 ids a request; the batch size says 1,000.
    harness = await make_harness(max_body_bytes=600 * ID_BYTES)
    source = make_ids(3_000)
    settings = harness.settings([harness.mapping("Large", source)], batch_size=1_000)
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    guid = harness.guid("Large")
    assert harness.sandbox.members(guid) == set(source)
    assert await snapshot_of(harness, "Large") == set(source)
    sent = segment_requests(harness.sandbox)
    assert [r.status for r in sent].count(413) == 1  # learnt once, then kept to
    assert [(r.kind, r.n_ids) for r in sent if r.status == 200 or r.status == 201] == [
        ("create", 0),
        *[("update", 500)] * 6,
    ]


async def test_one_id_answered_413_fails_the_run_with_a_clear_message(
    make_harness: HarnessFactory,
) -> None:
    # An empty create passes; any request carrying one (long) id does not.
    harness = await make_harness(max_body_bytes=100)
    settings = harness.settings([harness.mapping("Tiny", make_ids(4, "u" * 70))])
    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "413" in outcome.error
    assert "even to a request with one id" in outcome.error


async def pending_replay(harness: Harness, ids: list[str]) -> None:
    """A batch whose answer a crashed run never saw, sent under a larger batch size."""
    store = await opened(harness)
    try:
        await store.begin_batch("Replay", "add", ids)
    finally:
        await store.close()


async def pending_of(harness: Harness) -> list[str] | None:
    store = await opened(harness)
    try:
        pending = await store.pending_batch("Replay")
    finally:
        await store.close()
    return None if pending is None else pending.ids


async def test_pending_batch_is_replayed_in_todays_batch_size(
    make_harness: HarnessFactory,
) -> None:
    """WalkMe applied a batch whose answer the crashed run never saw, and its ids
    have left the source since: the next run sends it again first, in today's batch
    size, which makes the snapshot exact, so the diff then removes them."""
    harness = await make_harness(max_body_bytes=1_500 * ID_BYTES)
    source = make_ids(100)
    mappings = [harness.mapping("Replay", source)]
    # Removing the 3,000 is the point here, not what the removal guard is for.
    settings = harness.settings(mappings, batch_size=1_000, max_remove_fraction=1.0)
    assert (await harness.sync_one(settings)).result == "synced"
    guid = harness.guid("Replay")
    lost = make_ids(3_000, "lost")
    await pending_replay(harness, lost)
    for start in range(0, len(lost), 1_000):  # what the lost request did in WalkMe
        body = {"action": "add", "userIds": lost[start : start + 1_000]}
        status, answer = await raw_call(harness.sandbox, "PUT", f"{SEGMENTS_PATH}/{guid}", body)
        assert status == 200, answer
    # The crashed run never finished: the source is not the last synced one byte for byte.
    harness.source("Replay", reversed(source))
    harness.sandbox.clear_requests()

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    sent = segment_requests(harness.sandbox)
    assert [(r.action, r.n_ids, r.status) for r in sent] == [("add", 1_000, 200)] * 3 + [
        ("remove", 1_000, 200)
    ] * 3
    assert await pending_of(harness) is None
    assert harness.sandbox.members(guid) == set(source)
    assert await snapshot_of(harness, "Replay") == set(source)


async def test_replay_cut_short_keeps_every_unacknowledged_id_pending(
    harness: Harness, gateway: Gateway
) -> None:
    """Each acknowledged slice is recorded; the rest stays the pending batch, so
    the next run replays it (the lost request may have applied any of it)."""
    source = make_ids(100)
    settings = harness.settings(
        [harness.mapping("Replay", source)],
        walkme_api_url=gateway.url,
        batch_size=1_000,
        retry_attempts=2,
        max_remove_fraction=1.0,
    )
    assert (await harness.sync_one(settings)).result == "synced"
    lost = make_ids(3_000, "lost")
    await pending_replay(harness, lost)
    kept = source[1:]
    harness.source("Replay", kept)  # the lost ids (and one more) left the source meanwhile

    async def down(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"error": "internal_error"}, status=500)

    gateway.script["update"].extend([None, down, down])
    outcome = await harness.sync_one(settings)
    assert outcome.result == "failed"
    assert await pending_of(harness) == lost[1_000:]
    assert await snapshot_of(harness, "Replay") == set(source + lost[:1_000])

    # The next run finishes the replay, then the diff removes every lost id.
    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    assert await pending_of(harness) is None
    assert harness.sandbox.members(harness.guid("Replay")) == set(kept)
    assert await snapshot_of(harness, "Replay") == set(kept)


# ------------------------------------------------------------ secrets

ECHO_SECRET = 'itest/S3cret+echo=7f3a&never "print" me'


@pytest_asyncio.fixture
async def echo_harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness(client_secret=ECHO_SECRET)


async def test_no_secret_echoed_by_a_server_reaches_any_output_or_the_database(
    echo_harness: Harness,
) -> None:
    harness = echo_harness
    gateway = Gateway(harness.sandbox)
    await gateway.start()
    try:
        await check_nothing_leaks(harness, gateway)
    finally:
        await gateway.close()


def database_files(folder: Path) -> list[Path]:
    """The SQLite state database with its write-ahead log."""
    return sorted(folder.glob("state.db*"))


async def check_nothing_leaks(harness: Harness, gateway: Gateway) -> None:
    source = make_ids(6)
    mapping = harness.mapping("Echo", source)
    env = cli_env(gateway.url, harness.folder, [mapping], retry_attempts=2)
    env["SYNCD_WALKME_CLIENT_SECRET"] = ECHO_SECRET
    outputs: list[tuple[str, str]] = []

    async def syncd(*args: str, expect: int) -> None:
        code, out, err = await run_cli_async(*args, env=env)
        outputs.append((" ".join(args), out + err))
        assert code == expect, out + err

    await syncd("sync", expect=0)
    harness.source("Echo", [*source, "new@example.com"])
    gateway.script["token"].append(echo(422))  # the token call echoing the Basic credential
    await syncd("sync", expect=1)
    gateway.script["update"].extend(echo(400) for _ in range(10))  # echoing the Bearer token
    await syncd("sync", expect=1)
    for args in (("status",), ("status", "--json"), ("history", "--segment", "Echo", "--json")):
        await syncd(*args, expect=0)
    await syncd("history", "--segment", "Echo", expect=0)
    gateway.script["list"].append(echo(400))
    await syncd("check", expect=1)
    gateway.script["token"].append(echo(418))
    await syncd("check", expect=1)

    basic = base64.b64encode(f"{CLIENT_ID}:{ECHO_SECRET}".encode()).decode()
    forms = {
        "secret": ECHO_SECRET,
        "Basic credential": basic,
        "URL-encoded secret": quote(ECHO_SECRET, safe=""),
        "form-encoded secret": quote_plus(ECHO_SECRET),
        "JSON-escaped secret": json.dumps(ECHO_SECRET)[1:-1],
    }
    assert len(gateway.tokens) >= 3
    forms.update({f"token {token[:6]}...": token for token in gateway.tokens})
    everything = "\n".join(text for _, text in outputs)
    # The outputs did show the echoes, masked: the search covers real error texts.
    assert "echo" in everything
    assert "[redacted]" in everything
    database = b"".join(path.read_bytes() for path in database_files(harness.folder))
    leaks = [
        f"{what} in {label}"
        for label, text in outputs
        for what, form in forms.items()
        if form in text
    ]
    leaks += [
        f"{what} in the state database" for what, form in forms.items() if form.encode() in database
    ]
    assert leaks == []
