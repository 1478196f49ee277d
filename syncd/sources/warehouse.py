"""Heap Connect tables in a SQL warehouse: a query returning one column of ids.

PostgreSQL and Amazon Redshift (which speaks PostgreSQL's protocol) go through
asyncpg with a server-side cursor, so rows stream instead of loading whole.
Snowflake goes through its official connector, an optional extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from syncd.settings import describe_url
from syncd.sources.base import CHUNK_SIZE, SourceError

CONNECT_TIMEOUT = 30.0


class WarehouseSource:
    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self.query = query

    def __repr__(self) -> str:
        return f"<WarehouseSource {describe_url(self._url)}>"

    async def fingerprint(self) -> str | None:
        return None  # no cheap way to tell that the membership is unchanged

    def describe(self) -> str:
        return f"warehouse {describe_url(self._url)}"

    def chunks(self) -> AsyncIterator[list[object]]:
        if self._url.startswith("snowflake://"):
            return self._snowflake_chunks()
        return self._postgres_chunks()

    async def _postgres_chunks(self) -> AsyncIterator[list[object]]:
        import asyncpg  # only warehouse users pay for loading the driver

        where = describe_url(self._url)
        url = self._url.replace("redshift://", "postgresql://", 1)
        try:
            conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise SourceError(f"cannot connect to the warehouse {where}: {_reason(exc)}") from None
        try:
            async with conn.transaction(readonly=True):
                statement = await conn.prepare(self.query)
                columns = len(statement.get_attributes())
                if columns != 1:
                    raise SourceError(
                        f"warehouse query must return exactly one column, got {columns}"
                    )
                chunk: list[object] = []
                async for record in statement.cursor(prefetch=CHUNK_SIZE):
                    chunk.append(record[0])
                    if len(chunk) >= CHUNK_SIZE:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SourceError(f"warehouse query failed on {where}: {_reason(exc)}") from None
        finally:
            await conn.close(timeout=5)

    async def _snowflake_chunks(self) -> AsyncIterator[list[object]]:
        rows = self._snowflake_rows()
        while True:
            chunk = await asyncio.to_thread(next, rows, None)
            if chunk is None:
                return
            yield chunk

    def _snowflake_rows(self) -> Iterator[list[object]]:
        try:
            import snowflake.connector  # type: ignore[import-not-found]
        except ImportError:
            raise SourceError(
                "snowflake:// needs the Snowflake driver: pip install 'syncd[snowflake]'"
            ) from None
        where = describe_url(self._url)
        try:
            conn = snowflake.connector.connect(**_snowflake_params(self._url))
        except Exception as exc:
            raise SourceError(f"cannot connect to Snowflake {where}: {_reason(exc)}") from None
        try:
            cursor = conn.cursor()
            cursor.execute(self.query)
            while rows := cursor.fetchmany(CHUNK_SIZE):
                yield [row[0] for row in rows]
        except Exception as exc:
            raise SourceError(f"Snowflake query failed on {where}: {_reason(exc)}") from None
        finally:
            conn.close()


def _snowflake_params(url: str) -> dict[str, Any]:
    """snowflake://user:password@account/database/schema?warehouse=W&role=R"""
    parts = urlsplit(url)
    path = [unquote(p) for p in parts.path.split("/") if p]
    params: dict[str, Any] = {
        "account": parts.hostname,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
    }
    if path:
        params["database"] = path[0]
    if len(path) > 1:
        params["schema"] = path[1]
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        params[key] = unquote(value)
    return params


def _reason(exc: BaseException) -> str:
    # Driver messages name hosts and SQL, never the password; keep them short.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
