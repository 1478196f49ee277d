"""Plain files: one id per line, or one named column of a CSV file with a header."""

from __future__ import annotations

import asyncio
import csv
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from syncd.ids import ID_RULES_VERSION
from syncd.sources.base import CHUNK_SIZE, SourceError

MAX_LINE_BYTES = 1 << 20  # a longer "line" is binary junk, not a user id
BLOCK_BYTES = 1 << 20


class FileSource:
    def __init__(self, path: Path, column: str | None = None) -> None:
        self.path = path
        self.column = column

    def describe(self) -> str:
        return f"file {self.path}" + (f" column {self.column!r}" if self.column else "")

    async def fingerprint(self) -> str | None:
        """SHA-256 of the file's bytes (plus the column and the id rules' version)."""

        def digest() -> str:
            hasher = hashlib.sha256(f"{ID_RULES_VERSION}|{self.column}|".encode())
            with self.path.open("rb") as handle:
                while block := handle.read(BLOCK_BYTES):
                    hasher.update(block)
            return hasher.hexdigest()

        try:
            return await asyncio.to_thread(digest)
        except OSError:
            return None  # reading it properly reports the error

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
            if self.column is None:
                yield from self._plain_chunks(handle)
                return
            values = self._csv_values(self._lines(handle))
            chunk: list[object] = []
            for value in values:
                chunk.append(value)
                if len(chunk) >= CHUNK_SIZE:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    def _plain_chunks(self, handle: BinaryIO) -> Iterator[list[object]]:
        """One id per line, read in blocks: splitting and decoding stay in C."""
        pending = b""
        lines_before = 0
        while True:
            try:
                block = handle.read(BLOCK_BYTES)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
            if not block:
                break
            data = pending + block
            end = data.rfind(b"\n") + 1
            complete, pending = data[:end], data[end:]
            if len(pending) > MAX_LINE_BYTES:
                raise self._too_long(lines_before + complete.count(b"\n") + 1)
            if complete:
                yield from _slices(self._decode_lines(complete, lines_before))
                lines_before += complete.count(b"\n")
        if pending:
            yield from _slices(self._decode_lines(pending, lines_before))

    def _decode_lines(self, data: bytes, lines_before: int) -> list[object]:
        if b"\x00" in data:
            line = lines_before + data[: data.index(b"\x00")].count(b"\n") + 1
            raise SourceError(f"{self.path} line {line}: contains NUL bytes (binary file?)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = lines_before + data[: exc.start].count(b"\n") + 1
            raise SourceError(f"{self.path} line {line}: not valid UTF-8") from None
        if lines_before == 0:
            text = text.removeprefix("\ufeff")
        lines = text.split("\n")
        if lines and not lines[-1]:
            lines.pop()
        if max(map(len, lines), default=0) > MAX_LINE_BYTES:
            index = next(i for i, line in enumerate(lines) if len(line) > MAX_LINE_BYTES)
            raise self._too_long(lines_before + index + 1)
        return list(lines)

    def _too_long(self, line: int) -> SourceError:
        return SourceError(
            f"{self.path} line {line}: longer than {MAX_LINE_BYTES} bytes;"
            " is this a text file of user ids?"
        )

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
                raise self._too_long(number)
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


def _slices(values: list[object]) -> Iterator[list[object]]:
    for start in range(0, len(values), CHUNK_SIZE):
        yield values[start : start + CHUNK_SIZE]
