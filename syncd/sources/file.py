"""Plain files: one id per line, or one named column of a CSV file with a header."""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from syncd.ids import ID_RULES_VERSION
from syncd.sources.base import CHUNK_SIZE, Chunk, SourceError, chunks_in_thread, in_thread

MAX_LINE_BYTES = 1 << 20  # a longer "line" is binary junk, not a user id
BLOCK_BYTES = 1 << 20


class FileSource:
    def __init__(self, path: Path, column: str | None = None) -> None:
        self.path = path
        self.column = column
        self._read_fingerprint: str | None = None

    def describe(self) -> str:
        return f"file {self.path}" + (f" column {self.column!r}" if self.column else "")

    async def fingerprint(self) -> str | None:
        """SHA-256 of the file's bytes (plus the column and the id rules' version)."""

        def digest() -> str:
            with _OneRead(self.path, self.column) as handle:
                while handle.read(BLOCK_BYTES):
                    pass
                return handle.finish()

        try:
            return await in_thread(digest)
        except (SourceError, OSError):
            return None  # reading it properly reports the error

    def read_fingerprint(self) -> str | None:
        return self._read_fingerprint

    async def chunks(self) -> AsyncIterator[Chunk]:
        # File reads block; each chunk is read on a worker thread.
        self._read_fingerprint = None
        async for chunk in chunks_in_thread(self._read_chunks()):
            yield chunk

    def _read_chunks(self) -> Iterator[Chunk]:
        with _OneRead(self.path, self.column) as handle:
            if self.column is None:
                yield from self._plain_chunks(handle)
            else:
                yield from _slices_of(self._csv_values(self._lines(handle)))
            # Checked before the end is reported: a file that changed fails the run.
            self._read_fingerprint = handle.finish()

    def _plain_chunks(self, handle: _OneRead) -> Iterator[Chunk]:
        """One id per line, read in blocks and handed on as text: decoding stays in
        C and the id rules check each block whole."""
        pending = b""
        lines_before = 0
        while True:
            block = handle.read(BLOCK_BYTES)
            if not block:
                break
            data = pending + block
            end = data.rfind(b"\n") + 1
            complete, pending = data[:end], data[end:]
            # Every line but the first lies within one block, no longer than it.
            first_line = data.find(b"\n")
            if first_line > MAX_LINE_BYTES or len(pending) > MAX_LINE_BYTES:
                line = 1 if first_line > MAX_LINE_BYTES else complete.count(b"\n") + 1
                raise self._too_long(lines_before + line)
            if complete:
                yield self._decode(complete, lines_before)
                lines_before += complete.count(b"\n")
        if pending:
            yield self._decode(pending, lines_before)

    def _decode(self, data: bytes, lines_before: int) -> str:
        if b"\x00" in data:
            line = lines_before + data[: data.index(b"\x00")].count(b"\n") + 1
            raise SourceError(f"{self.path} line {line}: contains NUL bytes (binary file?)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = lines_before + data[: exc.start].count(b"\n") + 1
            raise SourceError(f"{self.path} line {line}: not valid UTF-8") from None
        return text.removeprefix("\ufeff") if lines_before == 0 else text

    def _too_long(self, line: int) -> SourceError:
        return SourceError(
            f"{self.path} line {line}: longer than {MAX_LINE_BYTES} bytes;"
            " is this a text file of user ids?"
        )

    def _lines(self, handle: _OneRead) -> Iterator[str]:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
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


def _slices_of(values: Iterator[str]) -> Iterator[Chunk]:
    chunk: list[object] = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= CHUNK_SIZE:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class _OneRead:
    """One open file, hashed as it is read, that knows whether it changed meanwhile.

    The ids and the fingerprint a run records both come from this one read, so the
    fingerprint describes exactly the bytes whose ids were diffed.
    """

    def __init__(self, path: Path, column: str | None) -> None:
        self.path = path
        self._hasher = hashlib.sha256(f"{ID_RULES_VERSION}|{column}|".encode())
        self._bytes = 0
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror}") from None
        try:
            # fstat, not stat before opening: the path may be swapped in between.
            self._opened = os.fstat(fd)
            for is_kind, kind in _NOT_REGULAR:
                if is_kind(self._opened.st_mode):
                    raise SourceError(f"{path} is {kind}, not a regular file of ids")
            os.set_blocking(fd, True)
            self._file = os.fdopen(fd, "rb", buffering=BLOCK_BYTES)
        except BaseException:
            os.close(fd)
            raise

    def __enter__(self) -> _OneRead:
        return self

    def __exit__(self, *_: object) -> None:
        self._file.close()

    def read(self, size: int) -> bytes:
        return self._count(self._file.read, size)

    def readline(self, limit: int) -> bytes:
        return self._count(self._file.readline, limit)

    def _count(self, read: Callable[[int], bytes], size: int) -> bytes:
        try:
            data = read(size)
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        self._hasher.update(data)
        self._bytes += len(data)
        return data

    def finish(self) -> str:
        """The fingerprint of what was read, once at the end of the file; a
        SourceError if the opened file changed while it was read (grown, truncated
        or rewritten), as its ids may then be a mix or a fragment. A file replaced
        by a rename meanwhile is not an error: the one opened was read whole and
        unchanged, and the next run's fingerprint sees the new one."""
        after = os.fstat(self._file.fileno())
        before = self._opened
        if self._bytes != before.st_size or (after.st_size, after.st_mtime_ns) != (
            before.st_size,
            before.st_mtime_ns,
        ):
            raise SourceError(f"{self.path} changed while being read; the next run reads it again")
        return self._hasher.hexdigest()
