"""Polling for a condition with a deadline, from threads and from coroutines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], timeout: float, message: str = "condition", step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(step)


async def wait_until_async(
    condition: Callable[[], bool], limit_s: float, message: str = "condition", step: float = 0.02
) -> None:
    """``wait_until`` for coroutines: the event loop (and an in-loop server) keeps turning."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {message}")
        await asyncio.sleep(step)
