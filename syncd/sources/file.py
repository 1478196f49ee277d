"""Plain files: one id per line, or one named column of a CSV file with a header."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from syncd.sources.base import CHUNK_SIZE, SourceError

MAX_LINE_BYTES = 1 << 20  # a longer "line" is binary junk, not a user id


class FileSource:
    def __init__(self, path: Path, column: str | None = None) -> None:
        self.path = path
        self.column = column

    def describe(self) -> str:
        return f"file {self.path}" + (f" column {self.column!r}" if self.column else "")

    async def chunks(self) -> AsyncIterator[list[object]]:
        # File reads block; each chunk is read on a worker thread.
        reader = self._read_chunks()
        while True:
            chunk = await asyncio.to_thread(next, reader, None)
            if chunk is None:
                return
            yield chunk

    def _read_chunks(self) -> Iterator[list[object]]:
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from None
        with handle:
            lines = self._lines(handle)
            values = self._csv_values(lines) if self.column else lines
            chunk: list[object] = []
            for value in values:
                chunk.append(value)
                if len(chunk) >= CHUNK_SIZE:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    def _lines(self, handle: BinaryIO) -> Iterator[str]:
        number = 0
        while True:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise SourceError(
                    f"{self.path} line {number}: longer than {MAX_LINE_BYTES} bytes;"
                    " is this a text file of user ids?"
                )
            if b"\x00" in raw:
                raise SourceError(f"{self.path} line {number}: contains NUL bytes (binary file?)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SourceError(f"{self.path} line {number}: not valid UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield line

    def _csv_values(self, lines: Iterator[str]) -> Iterator[str]:
        try:
            rows = csv.reader(lines, strict=True)  # a stray quote must fail, not swallow rows
            header = next(rows, None)
            if header is None:
                raise SourceError(f"{self.path}: empty CSV file, expected a header row")
            names = [name.strip() for name in header]
            if self.column not in names:
                raise SourceError(
                    f"{self.path}: no column {self.column!r} in the header"
                    f" (columns: {', '.join(names[:10])})"
                )
            index = names.index(self.column)
            for row in rows:
                if len(row) > index:
                    yield row[index]
        except csv.Error as exc:
            raise SourceError(f"{self.path}: malformed CSV: {exc}") from None
