"""Polling for a condition with a deadline, from threads and from coroutines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator


def _rounds(timeout: float, message: str) -> Iterator[None]:
    """One round per poll; past the deadline, the failure saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() <= deadline:
        yield
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def wait_until(
    condition: Callable[[], bool], timeout: float, message: str = "condition", step: float = 0.05
) -> None:
    for _ in _rounds(timeout, message):
        if condition():
            return
        time.sleep(step)


async def wait_until_async(
    condition: Callable[[], bool], limit_s: float, message: str = "condition", step: float = 0.02
) -> None:
    """``wait_until`` for coroutines: the event loop (and an in-loop server) keeps turning."""
    for _ in _rounds(limit_s, message):
        if condition():
            return
        await asyncio.sleep(step)
