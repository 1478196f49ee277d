"""Heap Connect tables in a warehouse, against a real PostgreSQL (Redshift's protocol).

Needs a PostgreSQL server: ``SYNCD_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Without one these tests fail,
saying how to point them at a server; they never skip.

The data is made once per module in a schema named ``heap_test_<random>``,
dropped at the end.
"""

# The SQL here is built from the test's own random schema name, never from input.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog

from syncd.app import open_runtime
from syncd.engine import Outcome
from syncd.sandbox import WalkMeSandbox
from syncd.settings import Settings
from syncd.sources.base import CHUNK_SIZE, SourceError
from syncd.sources.warehouse import WarehouseSource
from tests.support.heap import connect_identity, make_settings
from tests.support.postgres import postgres_url

USERS = 120_000


@dataclass(frozen=True)
class Warehouse:
    url: str
    schema: str
    paying_identities: frozenset[str]
    paying_user_ids: frozenset[str]
    small_ids: frozenset[str]

    def paying_query(self) -> str:
        s = self.schema
        return (
            f"SELECT u.identity FROM {s}.segment_paying_users s"
            f" JOIN {s}.users u ON u.user_id = s.user_id WHERE u.identity IS NOT NULL"
        )


def _rows() -> list[tuple[int, str | None, str, str | None, datetime, datetime]]:
    joined = datetime(2024, 1, 1)
    rows = []
    for user_id in range(1, USERS + 1):
        identity = connect_identity(user_id)
        rows.append(
            (
                user_id,
                identity,
                f"handle{user_id}",
                identity if identity and user_id % 3 else None,
                joined + timedelta(minutes=user_id),
                joined + timedelta(minutes=user_id, seconds=30),
            )
        )
    return rows


class Unreachable(Exception):
    """No PostgreSQL to test against; each test fails with this message."""


@dataclass(frozen=True)
class Postgres:
    warehouse: Warehouse | None
    problem: str | None = None

    def ready(self) -> Warehouse:
        """The test data, or a test failure (never a skip) saying how to get a server."""
        if self.warehouse is None:
            pytest.fail(self.problem or "no PostgreSQL", pytrace=False)
        return self.warehouse


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise Unreachable(
            f"PostgreSQL is not reachable at {url} ({type(exc).__name__}: {exc}). These"
            " warehouse tests need a real server: start one, or point them at one with"
            " SYNCD_TEST_POSTGRES_URL=postgresql://USER@HOST:PORT/DATABASE"
        ) from None


async def _create(url: str, schema: str) -> Warehouse:
    conn = await _connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.users (user_id BIGINT PRIMARY KEY, identity TEXT,"
            " handle TEXT, email TEXT, joindate TIMESTAMP, last_modified TIMESTAMP)"
        )
        await conn.execute(f"CREATE TABLE {schema}.segment_paying_users (user_id BIGINT)")
        await conn.execute(f"CREATE TABLE {schema}.segment_small (user_id BIGINT)")
        rows = _rows()
        await conn.copy_records_to_table("users", schema_name=schema, records=rows)
        paying = [(user_id,) for user_id in range(3, USERS + 1, 3)]
        await conn.copy_records_to_table(
            "segment_paying_users", schema_name=schema, records=paying
        )
        small = [(user_id,) for user_id in range(1, 51)]
        await conn.copy_records_to_table("segment_small", schema_name=schema, records=small)
    finally:
        await conn.close()
    identities = {connect_identity(user_id) for (user_id,) in paying}
    return Warehouse(
        url=url,
        schema=schema,
        paying_identities=frozenset(i for i in identities if i is not None),
        paying_user_ids=frozenset(str(user_id) for (user_id,) in paying),
        small_ids=frozenset(str(user_id) for (user_id,) in small),
    )


async def _drop(url: str, schema: str) -> None:
    conn = await _connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    url = postgres_url()
    schema = f"heap_test_{secrets.token_hex(6)}"
    try:
        created = asyncio.run(_create(url, schema))
    except Unreachable as exc:
        yield Postgres(None, str(exc))
        return
    except BaseException:
        asyncio.run(_drop(url, schema))
        raise
    try:
        yield Postgres(created)
    finally:
        asyncio.run(_drop(url, schema))


def _settings(
    sandbox: WalkMeSandbox, tmp_path: Path, url: str, segments: list[dict[str, Any]]
) -> Settings:
    return make_settings(
        sandbox.url, "sqlite:///" + str(tmp_path / "state.db"), segments=segments,
        warehouse_url=url,
    )


def _mapping(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "source": {"type": "warehouse", "query": query}}


async def _sync(settings: Settings) -> dict[str, Outcome]:
    async with open_runtime(settings, settings.mappings()) as runtime:
        outcomes = await runtime.engine.sync_all()
    return {outcome.segment: outcome for outcome in outcomes}


def _members(sandbox: WalkMeSandbox, name: str) -> set[str]:
    record = sandbox.find(name=name)
    assert record is not None, f"no WalkMe segment named {name!r}"
    return sandbox.members(record.guid)


# ------------------------------------------------------------------------ reading


async def test_source_streams_in_chunks(postgres: Postgres) -> None:
    warehouse = postgres.ready()
    source = WarehouseSource(warehouse.url, f"SELECT identity FROM {warehouse.schema}.users")
    sizes = []
    nulls = 0
    async for chunk in source.chunks():
        sizes.append(len(chunk))
        nulls += sum(1 for value in chunk if value is None)
    assert len(sizes) > 1
    assert max(sizes) <= CHUNK_SIZE
    assert sum(sizes) == USERS
    assert nulls == sum(1 for i in range(1, USERS + 1) if connect_identity(i) is None)
    assert nulls >= USERS // 10


async def test_source_describes_itself_without_the_password() -> None:
    source = WarehouseSource("postgresql://u:SuperSecret123@db.example.com:5439/dev", "SELECT 1")
    assert "SuperSecret123" not in source.describe()
    assert "SuperSecret123" not in repr(source)
    assert "db.example.com" in source.describe()


# ------------------------------------------------------------------------ syncing


async def test_identities_sync_to_walkme(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """40,000 paying users: NULL identities left out, duplicate identities sent once."""
    warehouse = postgres.ready()
    settings = _settings(sandbox, tmp_path, warehouse.url,
                         [_mapping("Paying", warehouse.paying_query())])
    outcome = (await _sync(settings))["Paying"]
    assert outcome.result == "synced", outcome.error
    members = _members(sandbox, "Paying")
    assert members == warehouse.paying_identities
    assert outcome.added == len(warehouse.paying_identities)
    assert outcome.skipped.count == 0
    # Sanity of the data itself: it does hold NULLs and duplicates.
    assert len(warehouse.paying_identities) < USERS // 3


async def test_integer_user_ids_become_strings(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    warehouse = postgres.ready()
    query = f"SELECT user_id FROM {warehouse.schema}.segment_paying_users"
    settings = _settings(sandbox, tmp_path, warehouse.url, [_mapping("Paying ids", query)])
    outcome = (await _sync(settings))["Paying ids"]
    assert outcome.result == "synced", outcome.error
    assert _members(sandbox, "Paying ids") == warehouse.paying_user_ids


async def test_failing_queries_fail_their_segment_only(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    warehouse = postgres.ready()
    s = warehouse.schema
    segments = [
        _mapping("Syntax", f"SELEC identity FROM {s}.users"),
        _mapping("Missing table", f"SELECT user_id FROM {s}.segment_that_does_not_exist"),
        _mapping("Two columns", f"SELECT user_id, identity FROM {s}.users"),
        _mapping("Small", f"SELECT user_id FROM {s}.segment_small"),
    ]
    outcomes = await _sync(_settings(sandbox, tmp_path, warehouse.url, segments))

    syntax = outcomes["Syntax"]
    assert syntax.result == "failed"
    assert syntax.error is not None
    assert "warehouse query failed" in syntax.error
    assert "syntax error" in syntax.error

    missing = outcomes["Missing table"]
    assert missing.result == "failed"
    assert missing.error is not None
    assert "segment_that_does_not_exist" in missing.error
    assert "does not exist" in missing.error

    two = outcomes["Two columns"]
    assert two.result == "failed"
    assert two.error is not None
    assert "exactly one column" in two.error
    assert "got 2" in two.error

    assert outcomes["Small"].result == "synced", outcomes["Small"].error
    assert _members(sandbox, "Small") == warehouse.small_ids
    for name in ("Syntax", "Missing table", "Two columns"):
        assert sandbox.find(name=name) is None
    assert sandbox.count("create") == 1
    assert sandbox.count("update") == 0


async def test_two_column_query_with_no_rows_still_fails(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """The column count is a property of the query, not of the rows it happens to return.

    Otherwise a wrong query over an empty table "succeeds" with an empty set, and the
    next run against a populated segment removes every member from WalkMe.
    """
    warehouse = postgres.ready()
    query = f"SELECT user_id, identity FROM {warehouse.schema}.users WHERE false"
    settings = _settings(sandbox, tmp_path, warehouse.url, [_mapping("Two empty", query)])
    outcome = (await _sync(settings))["Two empty"]
    assert outcome.result == "failed", "a two-column query was accepted because it had no rows"
    assert outcome.error is not None
    assert "exactly one column" in outcome.error
    assert sandbox.find(name="Two empty") is None


async def _failure_hiding_the_password(sandbox: WalkMeSandbox, tmp_path: Path, url: str) -> str:
    """Sync one segment from ``url`` (password SuperSecret123), which must fail before
    any WalkMe call with the password in neither the error nor a log line; the error."""
    settings = _settings(sandbox, tmp_path, url, [_mapping("Paying", "SELECT 1")])
    with structlog.testing.capture_logs() as logs:
        outcome = (await _sync(settings))["Paying"]
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert "SuperSecret123" not in outcome.error
    assert "SuperSecret123" not in repr(logs)
    assert sandbox.requests == []
    return outcome.error


async def test_unreachable_warehouse_fails_without_showing_the_password(
    sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    error = await _failure_hiding_the_password(
        sandbox, tmp_path, "postgresql://u:SuperSecret123@127.0.0.1:1/test"
    )
    assert "cannot connect to the warehouse" in error
    assert "127.0.0.1:1" in error


async def test_wrong_user_fails_without_showing_the_password(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """Connected, then refused (no such role): the message names the cause, not the password."""
    warehouse = postgres.ready()
    host = warehouse.url.split("@", 1)[1]
    url = f"postgresql://no_such_role_{secrets.token_hex(3)}:SuperSecret123@{host}"
    error = await _failure_hiding_the_password(sandbox, tmp_path, url)
    assert "warehouse" in error


async def test_query_changes_are_followed_with_adds_and_removes(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    warehouse = postgres.ready()
    s = warehouse.schema
    table = f"{s}.segment_follow_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(warehouse.url)
    try:
        await conn.execute(f"CREATE TABLE {table} (user_id BIGINT)")
        await conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 100)")
        query = (
            f"SELECT u.identity FROM {table} t JOIN {s}.users u USING (user_id)"
            " WHERE u.identity IS NOT NULL"
        )
        settings = _settings(sandbox, tmp_path, warehouse.url, [_mapping("Follow", query)])
        assert (await _sync(settings))["Follow"].result == "synced"
        await conn.execute(f"DELETE FROM {table} WHERE user_id <= 50")
        await conn.execute(f"INSERT INTO {table} SELECT generate_series(101, 120)")
        outcome = (await _sync(settings))["Follow"]
    finally:
        await conn.close()
    assert outcome.result == "synced", outcome.error
    expected = {connect_identity(i) for i in range(51, 121)} - {None}
    assert _members(sandbox, "Follow") == expected
    assert outcome.removed > 0
    assert outcome.added > 0


# ------------------------------------------------------------------------ zero rows


async def test_zero_rows_for_a_populated_segment_warns_with_the_numbers(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """A query that suddenly returns nothing while WalkMe holds members deserves a warning."""
    warehouse = postgres.ready()
    table = f"{warehouse.schema}.segment_empty_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(warehouse.url)
    try:
        await conn.execute(f"CREATE TABLE {table} (user_id BIGINT)")
        await conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 50)")
        settings = _settings(
            sandbox, tmp_path, warehouse.url,
            [_mapping("Emptied", f"SELECT user_id FROM {table}")],
        )
        first = (await _sync(settings))["Emptied"]
        assert first.result == "synced", first.error
        assert len(_members(sandbox, "Emptied")) == 50

        await conn.execute(f"TRUNCATE {table}")
        with structlog.testing.capture_logs() as logs:
            await _sync(settings)
    finally:
        await conn.close()
    warnings = [entry for entry in logs if entry["event"] == "segment.source_empty"]
    assert warnings, (
        "no segment.source_empty warning when the source returned 0 ids for a segment"
        f" with 50 members; events logged: {[entry['event'] for entry in logs]}"
    )
    warning = warnings[0]
    assert warning["log_level"] == "warning"
    assert warning["snapshot_members"] == 50
    assert warning["source_ids"] == 0


# ------------------------------------------------------------------------ column types


@pytest.mark.parametrize(
    ("expression", "kind", "text"),
    [
        ("'abc'::bytea", "bytea", "\\x616263"),
        ("ARRAY['a']", "text[]", "{a}"),
        ("12345678901234567::float8", "float8", "1.2345678901234568e+16"),
        ("1e20::numeric", "numeric", "100000000000000000000"),
        ("true", "bool", "true"),
        ("'2024-01-01'::date", "date", "2024-01-01"),
    ],
)
async def test_a_column_neither_text_nor_integer_is_refused_naming_it(
    postgres: Postgres,
    sandbox: WalkMeSandbox,
    tmp_path: Path,
    expression: str,
    kind: str,
    text: str,
) -> None:
    """Such values would reach WalkMe as Python's rendering (b'abc', ['a'], 1e+20);
    the cast the message recommends sends the text the database prints."""
    warehouse = postgres.ready()
    query = f"SELECT member FROM (SELECT {expression} AS member) AS q"
    cast = f"SELECT CAST(member AS TEXT) FROM (SELECT {expression} AS member) AS q"
    segments = [_mapping("Typed", query), _mapping("Cast", cast)]
    outcomes = await _sync(_settings(sandbox, tmp_path, warehouse.url, segments))
    assert outcomes["Typed"].result == "failed"
    assert outcomes["Typed"].error == (
        f"warehouse query column 'member' is of type {kind}, not text or an integer;"
        " select its text instead: CAST(member AS TEXT)"
    )
    assert sandbox.find(name="Typed") is None
    assert outcomes["Cast"].result == "synced", outcomes["Cast"].error
    assert _members(sandbox, "Cast") == {text}


# ------------------------------------------------------------------------ lost connections


async def test_a_connection_terminated_mid_stream_fails_the_read(postgres: Postgres) -> None:
    warehouse = postgres.ready()
    tag = f"syncd_test_{secrets.token_hex(4)}"
    source = WarehouseSource(
        warehouse.url, f"SELECT identity AS {tag} FROM {warehouse.schema}.users"
    )
    chunks = aiter(source.chunks())
    assert len(await anext(chunks)) == CHUNK_SIZE
    admin = await asyncpg.connect(warehouse.url)
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            f"%{tag}%",
        )
    finally:
        await admin.close()
    assert ended == 1
    with pytest.raises(SourceError, match="warehouse query failed on"):
        async for _ in chunks:
            pass


class CuttingProxy:
    """A TCP proxy to PostgreSQL that drops both sides once ``cut_after`` bytes
    went from the server to the client: a connection lost mid-stream."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        server_in, server = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, cut: bool
        ) -> None:
            sent = 0
            while data := await source.read(65536):
                if cut and sent + len(data) > self.cut_after:
                    sink.write(data[: self.cut_after - sent])
                    break
                sink.write(data)
                sent += len(data)
            for writer in (client, server):
                writer.transport.abort()

        await asyncio.gather(
            pipe(client_in, server, False), pipe(server_in, client, True), return_exceptions=True
        )


async def test_a_connection_cut_mid_stream_fails_the_run_and_sends_nothing(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    warehouse = postgres.ready()
    parts = urlsplit(warehouse.url)
    async with CuttingProxy(parts.port or 5432, cut_after=400_000) as proxy:
        userinfo = parts.netloc.rpartition("@")[0]
        url = parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}").geturl()
        query = f"SELECT identity FROM {warehouse.schema}.users"
        settings = _settings(sandbox, tmp_path, url, [_mapping("Cut", query)])
        with structlog.testing.capture_logs() as logs:
            outcome = (await _sync(settings))["Cut"]
    assert outcome.result == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("warehouse query failed on postgresql://127.0.0.1:")
    assert not [entry for entry in logs if entry["event"] == "segment.internal_error"]
    assert sandbox.find(name="Cut") is None


# ------------------------------------------------------------------------ hung queries


async def test_a_hung_query_fails_its_run_after_the_source_timeout(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    warehouse = postgres.ready()
    segments = [
        _mapping("Hung", "SELECT 'x'::text FROM pg_sleep(20)"),
        _mapping("Small", f"SELECT user_id FROM {warehouse.schema}.segment_small"),
    ]
    settings = make_settings(
        sandbox.url, "sqlite:///" + str(tmp_path / "state.db"), segments=segments,
        warehouse_url=warehouse.url, source_timeout=1,
    )
    started = asyncio.get_running_loop().time()
    outcomes = await _sync(settings)
    assert asyncio.get_running_loop().time() - started < 10
    hung = outcomes["Hung"]
    assert hung.result == "failed"
    assert hung.error is not None
    assert "did not answer within 1 s (SYNCD_SOURCE_TIMEOUT)" in hung.error
    assert outcomes["Small"].result == "synced", outcomes["Small"].error
    assert sandbox.find(name="Hung") is None


# ------------------------------------------------------------------------ passwords in URLs


@pytest.mark.parametrize(
    "password", ["Kq9?Lm2Qz", "Ab3#Xy7Wv", "Zz12?34Qq", "Rr4/Bb7Tt", "Pp8@Ss9Uu"]
)
async def test_a_url_with_an_unencoded_password_fails_without_any_piece_of_it(
    postgres: Postgres, sandbox: WalkMeSandbox, tmp_path: Path, password: str
) -> None:
    """Even past the start-up check (a source built directly), the run's error says
    what to fix and holds no fragment of the password."""
    warehouse = postgres.ready()
    host = warehouse.url.split("@", 1)[1]
    source = WarehouseSource(f"postgresql://postgres:{password}@{host}", "SELECT 1")
    with pytest.raises(SourceError) as info:
        async for _ in source.chunks():
            pass
    message = str(info.value)
    assert "percent-encode" in message
    for fragment in re.split(r"[?#/@]", password):
        assert fragment not in message
        assert fragment not in source.describe()


async def test_a_driver_message_never_shows_the_password(postgres: Postgres) -> None:
    """A message that happens to hold the password (here: as the user name) is blanked."""
    warehouse = postgres.ready()
    host = warehouse.url.split("@", 1)[1]
    secret = f"Pw{secrets.token_hex(4)}"
    source = WarehouseSource(f"postgresql://{secret}:{secret}@{host}", "SELECT 1")
    with pytest.raises(SourceError) as info:
        async for _ in source.chunks():
            pass
    assert "does not exist" in str(info.value)
    assert secret not in str(info.value)
