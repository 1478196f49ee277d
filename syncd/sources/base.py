"""The source interface: where a segment's desired membership comes from."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol, TypeVar

CHUNK_SIZE = 10_000  # ids handed to the state store at a time: bounded memory per source
POLL_S = 0.2  # how often a waiting read looks for a shutdown
CLEANUP_S = 5.0  # how long an abandoned read may take to close its connection

T = TypeVar("T")


class SourceError(Exception):
    """The source could not be read; the message tells the user what to fix."""


# A chunk of raw values (strings, integers or None), or text holding one raw value
# per line (a file's lines, a page of a table), which the id rules check block-wide.
Chunk = list[object] | str


class Source(Protocol):
    """Yields the full current membership of one segment, in chunks of raw values.

    The engine applies the id rules.
    A source raises :class:`SourceError` when it cannot give the whole set:
    a partial set must never reach the diff, or members would be removed.
    """

    def describe(self) -> str:
        """Where the ids come from, for logs (never containing a secret)."""
        ...

    def chunks(self) -> AsyncIterator[Chunk]:
        """The membership, chunk by chunk."""
        ...

    async def fingerprint(self) -> str | None:
        """A digest of the source as it is now, or None when the source has none
        (then every run reads and diffs in full). Equal digests mean equal ids."""
        ...

    def read_fingerprint(self) -> str | None:
        """The digest of exactly what the last complete ``chunks()`` yielded, or None.

        This, not :meth:`fingerprint`, is what a successful run records: the source
        may change between the two, and a recorded digest must describe the ids
        that were diffed and delivered.
        """
        ...


class NoFingerprint:
    """For a source with no cheap way to tell that its membership is unchanged:
    every run reads and diffs it in full."""

    async def fingerprint(self) -> str | None:
        return None

    def read_fingerprint(self) -> str | None:
        return None


async def bounded(
    step: Awaitable[T], limit_s: float, source: Source, check: Callable[[], None]
) -> T:
    """Await one step of reading ``source``: at most ``limit_s`` seconds, and only
    until ``check`` raises (a shutdown), so a hung source fails its own run and
    never holds up the daemon. A step stuck in a thread cannot be cancelled; the
    run just stops waiting for it."""
    task = asyncio.ensure_future(step)
    deadline = asyncio.get_running_loop().time() + limit_s
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(POLL_S, left)))
            if done:
                return task.result()
            check()
            if left <= 0:
                raise SourceError(
                    f"{source.describe()} did not answer within {limit_s:g} s"
                    " (SYNCD_SOURCE_TIMEOUT); the next run reads it again"
                )
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CLEANUP_S)


async def bounded_chunks(
    source: Source, limit_s: float, check: Callable[[], None]
) -> AsyncIterator[Chunk]:
    """``source.chunks()``, each chunk awaited through :func:`bounded`."""
    chunks = aiter(source.chunks())
    while True:
        try:
            chunk = await bounded(anext(chunks), limit_s, source, check)
        except StopAsyncIteration:
            return
        yield chunk


async def in_thread(function: Callable[[], T]) -> T:
    """Run blocking source I/O on a daemon thread of its own.

    Unlike ``asyncio.to_thread``'s executor threads, which the interpreter joins
    at exit, an abandoned daemon thread (a read hung in the kernel, as on a dead
    NFS mount) cannot keep the process from stopping on SIGTERM.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting task
            _settle_soon(loop, _fail, future, exc)
        else:
            _settle_soon(loop, _succeed, future, result)

    threading.Thread(target=run, name="syncd-source-read", daemon=True).start()
    return await future


async def chunks_in_thread(chunks: Iterator[Chunk]) -> AsyncIterator[Chunk]:
    """A blocking iterator of chunks, each ``next`` run through :func:`in_thread`."""
    while True:
        chunk = await in_thread(partial(next, chunks, None))
        if chunk is None:
            return
        yield chunk


def _settle_soon(
    loop: asyncio.AbstractEventLoop,
    settle: Callable[[asyncio.Future[T], Any], None],
    future: asyncio.Future[T],
    value: Any,
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(settle, future, value)


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # else the run stopped waiting
        future.set_result(result)


def _fail(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
