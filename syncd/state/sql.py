"""What the two SQL stores share: statements written once, and the dialect that
tells them apart.

A store operation is a *script*: a generator that yields ``Query``s and is sent
each one's ``Result``. Scripts hold the logic and the SQL (``?`` placeholders, a
``Dialect`` filling in what the two databases spell differently); each store only
drives them: SQLite runs a whole script on its database thread, PostgreSQL awaits
each statement. So the logic exists once and neither store pays for the other.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from syncd.ids import IdText
from syncd.state.base import LeaseLost

_T = TypeVar("_T")


class Row(Protocol):
    """A result row, read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str | int, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Query:
    sql: str  # ``?`` placeholders
    args: Sequence[Any] = ()
    many: bool = False  # ``args`` is a list of argument tuples, one statement each


@dataclass(frozen=True, slots=True)
class Result:
    rows: Sequence[Row]
    count: int  # rows written by a write, rows returned by a read

    def value(self) -> Any:
        """The first column of the first row, or None without rows."""
        return self.rows[0][0] if self.rows else None


Script = Generator[Query, Result, _T]


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the scripts need."""

    name: Literal["sqlite", "postgresql"]
    now: str  # the time segments and runs are stamped with (to the second)
    now_precise: str  # the same, as precise as the database keeps it
    wall_clock: str  # epoch seconds, for replica heartbeats
    run_order: str  # a column giving the order runs were begun in
    text_order: str  # after a text column in ORDER BY: by code point, as Python sorts
    in_ids: str  # "{column} is in the id list given as one parameter"
    each_id: str  # FROM-less select list of each id in the one parameter
    joined_ids: str  # aggregate: the ids of a query, one per line
    encode_ids: Callable[[list[str]], object]  # an id list as that parameter
    encode_pending: Callable[[list[str]], object]  # pending.ids
    decode_pending: Callable[[Any], list[str]]
    encode_names: Callable[[list[str]], object]  # replicas.mappings
    decode_names: Callable[[Any], list[str]]
    time_arg: Callable[[datetime], object]  # a time as a parameter
    time_value: Callable[[Any], datetime | None]  # a stored time

    def ids_in(self, column: str) -> str:
        return self.in_ids.format(column=column)


@lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``... (no literal holds a ``?``)."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


class SqlStore(ABC):
    """The base of both stores: runs scripts as one transaction (``_write``) or as
    plain reads (``_read``), and fences writes with the lease."""

    dialect: ClassVar[Dialect]

    @abstractmethod
    async def _write(self, script: Script[_T]) -> _T:
        """Run the script as one transaction (rolled back if it raises)."""

    @abstractmethod
    async def _read(self, script: Script[_T]) -> _T:
        """Run the script's reads, outside a transaction."""

    async def _read_in_key_order(self, script: Script[_T]) -> _T:
        """``_read`` for a keyset page, which must walk the primary key in order."""
        return await self._read(script)

    @abstractmethod
    def _lease_held(self, name: str, holder: str) -> Query:
        """A query with a row while ``holder`` holds the segment's unexpired lease,
        keeping it so until the transaction ends."""

    async def _id_pages(
        self, table: str, key: str, value: object, size: int
    ) -> AsyncIterator[IdText]:
        """A table's ids for one key, ``size`` at a time, each page one text joined in
        the database (no Python object per id). Keyset paging: a page is found by its
        last id (an index walk), then joined as a plain range, which the database
        scans twice as fast as a sorted, limited subquery; nothing is held between
        pages."""

        def page(after: str) -> Script[tuple[IdText, str | None]]:
            last = (
                yield Query(
                    f"SELECT id FROM {table} WHERE {key} = ? AND id > ?"
                    " ORDER BY id LIMIT 1 OFFSET ?",
                    (value, after, size - 1),
                )
            ).value()
            up_to = "" if last is None else " AND id <= ?"
            args = (value, after) if last is None else (value, after, last)
            text = (
                yield Query(
                    f"SELECT {self.dialect.joined_ids} FROM {table}"
                    f" WHERE {key} = ? AND id > ?{up_to}",
                    args,
                )
            ).value()
            return IdText(text or ""), last

        after: str | None = ""
        while after is not None:
            chunk, after = await self._read_in_key_order(page(after))
            if chunk:
                yield chunk

    def _fence(self, name: str, holder: str | None) -> Script[None]:
        """Raise LeaseLost unless ``holder`` (when given) holds the segment's lease."""
        if holder is not None and not (yield self._lease_held(name, holder)).rows:
            raise LeaseLost(name)
