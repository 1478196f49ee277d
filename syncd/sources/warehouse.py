"""Heap Connect tables in a SQL warehouse: a query returning one column of ids.

PostgreSQL and Amazon Redshift (which speaks PostgreSQL's protocol) go through
asyncpg with a server-side cursor, so rows stream instead of loading whole.
Snowflake goes through its official connector, an optional extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import unquote

from syncd.snowflake_url import DRIVER_HINT, parse_snowflake_url
from syncd.sources.base import CHUNK_SIZE, Chunk, NoFingerprint, SourceError, chunks_in_thread
from syncd.urls import URL_HINT, describe_url, unambiguous_url

CONNECT_TIMEOUT = 30.0
# Columns whose values are user ids as they are: text, or integers (sent as their
# digits, as the database prints them). Anything else is refused with a hint to cast
# it, rather than sending Python's rendering of it (b'..', 1e+20, ['a']).
POSTGRES_ID_TYPES = frozenset(
    {"text", "varchar", "bpchar", "name", "citext", "int2", "int4", "int8"}
)
SNOWFLAKE_FIXED, SNOWFLAKE_TEXT = 0, 2  # snowflake.connector.constants.FIELD_TYPES


class WarehouseSource(NoFingerprint):
    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self.query = query

    def __repr__(self) -> str:
        return f"<WarehouseSource {describe_url(self._url)}>"

    def describe(self) -> str:
        return f"warehouse {describe_url(self._url)}"

    def chunks(self) -> AsyncIterator[Chunk]:
        if not unambiguous_url(self._url):
            return self._unparsable()
        if self._url.startswith("snowflake://"):
            return chunks_in_thread(self._snowflake_rows())
        return self._postgres_chunks()

    async def _unparsable(self) -> AsyncIterator[list[object]]:
        # Drivers would misread the URL and quote its pieces, password included.
        raise SourceError(
            f"cannot connect to the warehouse {describe_url(self._url)}:"
            f" SYNCD_WAREHOUSE_URL cannot be parsed; {URL_HINT}"
        )
        yield []  # an async generator, like the others

    async def _postgres_chunks(self) -> AsyncIterator[list[object]]:
        import asyncpg  # only warehouse users pay for loading the driver

        where = describe_url(self._url)
        url = self._url.replace("redshift://", "postgresql://", 1)
        try:
            conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            reason = _reason(exc, self._url)
            raise SourceError(f"cannot connect to the warehouse {where}: {reason}") from None
        except Exception:
            # The driver's URL parse errors quote pieces of the URL, password included.
            raise SourceError(
                f"cannot connect to the warehouse {where}: SYNCD_WAREHOUSE_URL cannot be parsed;"
                f" {URL_HINT}"
            ) from None
        try:
            async with conn.transaction(readonly=True):
                statement = await conn.prepare(self.query)
                _check_column([(a.name, a.type.name) for a in statement.get_attributes()])
                chunk: list[object] = []
                async for record in statement.cursor(prefetch=CHUNK_SIZE):
                    chunk.append(record[0])
                    if len(chunk) >= CHUNK_SIZE:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = _reason(exc, self._url)
            raise SourceError(f"warehouse query failed on {where}: {reason}") from None
        finally:
            await conn.close(timeout=5)

    def _snowflake_rows(self) -> Iterator[list[object]]:
        try:
            import snowflake.connector
        except ImportError:
            raise SourceError(DRIVER_HINT) from None
        where = describe_url(self._url)
        hidden: list[str] = []
        try:
            url = parse_snowflake_url(self._url)  # checked at start; files may change since
            hidden = url.secrets()
            conn = snowflake.connector.connect(**url.connect_args(CONNECT_TIMEOUT))
        except Exception as exc:
            reason = _reason(exc, self._url, hidden)
            raise SourceError(f"cannot connect to Snowflake {where}: {reason}") from None
        try:
            cursor = conn.cursor()
            cursor.execute(self.query)
            _check_column(_snowflake_columns(cursor.description))
            # The connector downloads Snowflake's result chunks as they are needed
            # (a few ahead); fetchmany hands them on without collecting the whole set.
            while rows := cursor.fetchmany(CHUNK_SIZE):
                yield [row[0] for row in rows]
        except SourceError:
            raise
        except Exception as exc:
            reason = _reason(exc, self._url, hidden)
            raise SourceError(f"Snowflake query failed on {where}: {reason}") from None
        finally:
            conn.close()


def _check_column(columns: Sequence[tuple[str, str]]) -> None:
    """Refuse a query whose result is not one column of text or integers."""
    if len(columns) != 1:
        raise SourceError(f"warehouse query must return exactly one column, got {len(columns)}")
    [(name, kind)] = columns
    if kind not in POSTGRES_ID_TYPES:
        raise SourceError(
            f"warehouse query column {name!r} is of type {kind}, not text or an integer;"
            f" select its text instead: CAST({name} AS TEXT)"
        )


def _snowflake_columns(description: Sequence[Any]) -> list[tuple[str, str]]:
    """Snowflake's column metadata in PostgreSQL's type names, for :func:`_check_column`:
    NUMBER with scale 0 counts as an integer, TEXT as text, the rest by its type code."""
    columns = []
    for column in description:
        name, code, scale = column[0], column[1], column[5]
        if code == SNOWFLAKE_TEXT:
            kind = "text"
        elif code == SNOWFLAKE_FIXED and not scale:
            kind = "int8"
        elif code == SNOWFLAKE_FIXED:
            kind = f"NUMBER with scale {scale}"
        else:
            kind = f"Snowflake type code {code}"
        columns.append((str(name), kind))
    return columns


def _reason(exc: BaseException, url: str, hidden: Sequence[str] = ()) -> str:
    """The driver's message, short, with the URL's password (and ``hidden``: a key's
    passphrase) blanked out wherever it appears (drivers name hosts and SQL; this
    keeps the secrets out by construction)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for secret in sorted({*_passwords(url), *hidden}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text[:300]


def _passwords(url: str) -> list[str]:
    """The URL's password as written and decoded (longest first), or nothing; found
    by the last "@", so even a password with unencoded "/", "?" or "#" is found."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return sorted({p for p in (password, unquote(password)) if p}, key=len, reverse=True)
