"""``syncd.sources.file.FileSource``: plain id lists and CSV columns, and bad files."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from syncd.ids import SkippedIds, clean_ids, clean_text
from syncd.sources.base import CHUNK_SIZE, Chunk, SourceError
from syncd.sources.file import BLOCK_BYTES, MAX_LINE_BYTES, FileSource


async def read(path: Path, column: str | None = None) -> list[Chunk]:
    return [chunk async for chunk in FileSource(path, column).chunks()]


def cleaned(chunk: Chunk, skipped: SkippedIds) -> list[str]:
    """A chunk through the id rules, as the engine applies them."""
    if isinstance(chunk, str):
        return clean_text(chunk, skipped).ids()
    return clean_ids(chunk, skipped)


async def read_ids(path: Path, column: str | None = None) -> list[str]:
    skipped = SkippedIds()
    ids: list[str] = []
    for chunk in await read(path, column):
        ids += cleaned(chunk, skipped)
    assert skipped.count == 0, skipped.examples
    return ids


def write(tmp_path: Path, data: bytes, name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def test_one_id_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"a@x.com\nb@x.com\n\n  c@x.com  \nd@x.com")
    assert await read_ids(path) == ["a@x.com", "b@x.com", "c@x.com", "d@x.com"]


async def test_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, b"a@x.com\r\nb@x.com\r\n")
    assert await read_ids(path) == ["a@x.com", "b@x.com"]


async def test_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffa@x.com\nb@x.com\n".encode())
    assert await read_ids(path) == ["a@x.com", "b@x.com"]


async def test_utf8_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "jürgen@beispiel.de\n用户42\n".encode())
    assert await read_ids(path) == ["jürgen@beispiel.de", "用户42"]


async def test_empty_file(tmp_path: Path) -> None:
    assert await read(write(tmp_path, b"")) == []


async def test_csv_column_with_quoting(tmp_path: Path) -> None:
    data = (
        "\ufeffname,email,plan\r\n"
        '"Doe, Jane",jane@x.com,pro\r\n'
        '"Smith ""Bob""","bob@x.com",free\r\n'
        '"multi\r\nline",multi@x.com,pro\r\n'
        "\r\n"
        "Eve,eve@x.com,free\r\n"
    ).encode()
    path = write(tmp_path, data, "users.csv")
    assert await read_ids(path, "email") == [
        "jane@x.com",
        "bob@x.com",
        "multi@x.com",
        "eve@x.com",
    ]
    names = [value for chunk in await read(path, "name") for value in chunk]
    assert names == ["Doe, Jane", 'Smith "Bob"', "multi\r\nline", "Eve"]


async def test_csv_header_names_are_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, b" id , email \n1,a@x.com\n", "users.csv")
    assert await read_ids(path, "email") == ["a@x.com"]


async def test_csv_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, b"name,mail\nJane,jane@x.com\n", "users.csv")
    with pytest.raises(SourceError, match="email") as info:
        await read(path, "email")
    assert "mail" in str(info.value)  # the columns there are shown


async def test_csv_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="header"):
        await read(write(tmp_path, b"", "users.csv"), "email")


async def test_csv_unterminated_quote_is_an_error(tmp_path: Path) -> None:
    # An unclosed quote swallows every later line into one field: a partial set,
    # which would remove members from WalkMe. It must fail the read instead.
    data = b'email\n"a@x.com\nb@x.com\nc@x.com\n'
    with pytest.raises(SourceError):
        await read(write(tmp_path, data, "users.csv"), "email")


async def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"a@x.com\nb@x.com\n\xff\xfe@x.com\nd@x.com\n")
    with pytest.raises(SourceError, match="line 3") as info:
        await read(path)
    assert "UTF-8" in str(info.value)
    assert str(path) in str(info.value)


async def test_invalid_utf8_in_csv_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\na@x.com\nb\xc3(@x.com\n", "users.csv")
    with pytest.raises(SourceError, match="line 3"):
        await read(path, "email")


async def test_nul_bytes(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="NUL"):
        await read(write(tmp_path, b"a@x.com\nb\x00c\n"))


async def test_binary_file(tmp_path: Path) -> None:
    junk = bytes(range(256)) * 64
    with pytest.raises(SourceError):
        await read(write(tmp_path, junk, "image.png"))


async def test_line_over_1_mib(tmp_path: Path) -> None:
    assert MAX_LINE_BYTES == 1 << 20
    data = b"a@x.com\n" + b"x" * 1_100_000 + b"\nb@x.com\n"
    with pytest.raises(SourceError, match="line 2"):
        await read(write(tmp_path, data))


async def test_line_over_1_mib_without_newline(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        await read(write(tmp_path, b"y" * 1_100_000))


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    with pytest.raises(SourceError) as info:
        await read(path)
    assert str(path) in str(info.value)


async def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        await read(tmp_path)


async def test_a_plain_file_comes_in_blocks_of_whole_lines(tmp_path: Path) -> None:
    """Text blocks of about BLOCK_BYTES, each ending with a whole line, so no id is
    cut and no block holds the whole file."""
    total = 200_000
    path = write(tmp_path, "".join(f"user{i}@x.com\n" for i in range(total)).encode())
    chunks = await read(path)
    assert len(chunks) == math.ceil(path.stat().st_size / BLOCK_BYTES)
    assert all(isinstance(chunk, str) and chunk.endswith("\n") for chunk in chunks)
    assert all(len(chunk) <= BLOCK_BYTES + 32 for chunk in chunks)
    ids = await read_ids(path)
    assert ids == [f"user{i}@x.com" for i in range(total)]


async def test_csv_chunks(tmp_path: Path) -> None:
    total = CHUNK_SIZE + 5
    text = "id,email\n" + "".join(f"{i},u{i}@x.com\n" for i in range(total))
    path = write(tmp_path, text.encode(), "users.csv")
    chunks = await read(path, "email")
    assert [len(chunk) for chunk in chunks] == [CHUNK_SIZE, 5]
    assert chunks[1][-1] == f"u{total - 1}@x.com"


def test_describe(tmp_path: Path) -> None:
    assert str(tmp_path) in FileSource(tmp_path / "a.csv", "email").describe()
    assert "email" in FileSource(tmp_path / "a.csv", "email").describe()


# ------------------------------------------------------------- one consistent read


async def test_a_fifo_is_refused_at_once_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "ids.fifo"
    os.mkfifo(fifo)
    try:
        with pytest.raises(SourceError, match="is a FIFO, not a regular file") as info:
            await asyncio.wait_for(read(fifo), 5)
        assert str(fifo) in str(info.value)
        assert await asyncio.wait_for(FileSource(fifo).fingerprint(), 5) is None
    finally:
        _release_fifo_readers(fifo)


async def test_a_device_is_refused(tmp_path: Path) -> None:
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)
    with pytest.raises(SourceError, match="is a character device, not a regular file"):
        await asyncio.wait_for(read(Path("/dev/zero")), 5)


def _release_fifo_readers(fifo: Path) -> None:
    """A reader blocked opening the FIFO (the bug) is let go, so the test can end."""
    with contextlib.suppress(OSError):  # ENXIO: nobody was waiting
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


BIG_IDS = 200_000  # ~4.6 MB: several read blocks, so a change mid-read meets unread bytes


def _big_file(tmp_path: Path, name: str = "ids.txt", header: str = "") -> Path:
    text = header + "".join(f"user{i:07d}@example.com\n" for i in range(BIG_IDS))
    return write(tmp_path, text.encode(), name)


def _truncate_mid_line(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size * 65 // 100 + 7)  # 65% kept, the last line cut


def _append(path: Path) -> None:
    with path.open("ab") as handle:
        handle.write(b"late@example.com\n")


def _rewrite_in_place(path: Path) -> None:
    time.sleep(0.05)  # a later modification time than the original write
    data = path.read_bytes()
    with path.open("r+b") as handle:
        handle.write(data.replace(b"user", b"USER"))


def _replace_by_rename(path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(b"other@example.com\n")
    partial.replace(path)


@pytest.mark.parametrize("change", [_truncate_mid_line, _append, _rewrite_in_place])
@pytest.mark.parametrize("column", [None, "email"])
async def test_a_file_changed_while_it_is_read_fails_the_read(
    tmp_path: Path, change: Callable[[Path], None], column: str | None
) -> None:
    path = _big_file(tmp_path, "ids.csv", header="email\n" if column else "")
    source = FileSource(path, column)
    chunks = aiter(source.chunks())
    first = await anext(chunks)
    assert len(cleaned(first, SkippedIds())) < BIG_IDS  # changed in mid-read
    change(path)
    with pytest.raises(SourceError, match="changed while being read") as info:
        async for _ in chunks:
            pass
    assert str(path) in str(info.value)
    assert source.read_fingerprint() is None


@pytest.mark.parametrize("column", [None, "email"])
async def test_a_file_renamed_over_while_it_is_read_is_read_whole_as_it_was_opened(
    tmp_path: Path, column: str | None
) -> None:
    """An export job that writes aside and renames over the file (the recommended way)
    does not fail a run that opened the previous version: that version is read whole,
    and its digest is what the run records."""
    path = _big_file(tmp_path, "ids.csv", header="email\n" if column else "")
    opened = await FileSource(path, column).fingerprint()
    source = FileSource(path, column)
    chunks = aiter(source.chunks())
    skipped = SkippedIds()
    count = len(cleaned(await anext(chunks), skipped))
    _replace_by_rename(path)
    count += sum([len(cleaned(chunk, skipped)) async for chunk in chunks])
    assert count == BIG_IDS
    assert source.read_fingerprint() == opened
    assert await FileSource(path, column).fingerprint() != opened


async def test_the_read_fingerprint_is_the_digest_of_the_bytes_read(tmp_path: Path) -> None:
    path = write(tmp_path, b"a@x.com\nb@x.com\n")
    source = FileSource(path)
    before = await source.fingerprint()
    assert before is not None
    _replace_by_rename(path)  # between the cheap check and the read
    assert await read_ids_of(source) == ["other@example.com"]
    after = source.read_fingerprint()
    assert after is not None
    assert after != before
    assert after == await FileSource(path).fingerprint()


async def read_ids_of(source: FileSource) -> list[str]:
    skipped = SkippedIds()
    return [member async for chunk in source.chunks() for member in cleaned(chunk, skipped)]
