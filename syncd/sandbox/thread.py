"""Serving the fake WalkMe from a daemon thread, for callers without an event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

from syncd.sandbox.server import WalkMeSandbox


@contextlib.contextmanager
def run_sandbox_in_thread(
    *, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> Iterator[WalkMeSandbox]:
    """Run a ``WalkMeSandbox(**kwargs)`` on its own event loop in a daemon thread.

    Yields the started sandbox; its ``url`` is ready. Use its thread-safe methods
    (``members``, ``size``, ``find``, ``count``, ``state``) from the calling thread.
    """
    with serve_in_thread(WalkMeSandbox(**kwargs), host, port) as sandbox:
        yield sandbox


class Served(Protocol):
    """A server with the sandbox's start and stop (a test's own receiver, say)."""

    async def start(self, host: str, port: int) -> str: ...

    async def stop(self) -> None: ...


_Server = TypeVar("_Server", bound=Served)


@contextlib.contextmanager
def serve_in_thread(server: _Server, host: str = "127.0.0.1", port: int = 0) -> Iterator[_Server]:
    """Serve an already built sandbox (a test's subclass, say), or any server with its
    ``start`` and ``stop``, from a daemon thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="serve-in-thread", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(host, port), loop).result(timeout=30)
        yield server
    finally:
        try:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.close()
