"""The source interface: where a segment's desired membership comes from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

CHUNK_SIZE = 10_000  # ids handed to the state store at a time: bounded memory per source


class SourceError(Exception):
    """The source could not be read; the message tells the user what to fix."""


class Source(Protocol):
    """Yields the full current membership of one segment, in chunks of raw values.

    Values may be strings, numbers or None; the engine applies the id rules.
    A source raises :class:`SourceError` when it cannot give the whole set:
    a partial set must never reach the diff, or members would be removed.
    """

    def describe(self) -> str:
        """Where the ids come from, for logs (never containing a secret)."""
        ...

    def chunks(self) -> AsyncIterator[list[object]]:
        """The membership, chunk by chunk."""
        ...

    async def fingerprint(self) -> str | None:
        """A cheap digest that changes whenever the membership may have changed,
        or None when the source has none (then every run diffs in full)."""
        ...
